"""Host memory of the long jobs does not grow with their length: `finetune` and `embed` over few and over
ten times more batches, with a device slower than the decoding (where an unbounded read-ahead piles up
preprocessed batches), hold the same resident size: finetune (an endless stream) at step 4 and at step 40
of one run, embed (a finite list) at its peak over 4 batches and over 40."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from test_embed import write_photos

REPO = Path(__file__).parents[1]
BATCH = 8
FEW, MANY = 4, 40  # batches: as many as the loaders read ahead, and ten times that
IMAGE_BYTES = 224 * 224 * 3 * 4  # one preprocessed image of the test model (float32)

# Runs in a fresh process: resident sizes of this process and its children (sampled every 5 ms for the
# peaks). The device is made slower than the decoding, as a large model is (finetune 250 ms more a step,
# embed 50 ms more a batch), so that whatever the loaders read ahead shows.
SCRIPT = """
import json, os, signal, sys, threading, time
import psutil
import siglip2_jax
from siglip2_jax.embed import embed
from siglip2_jax.pipeline import Siglip2Pipeline
from siglip2_jax.train import Interrupted, TrainConfig, finetune

model, root, tmp, batch, few, many = sys.argv[1:]
batch, few, many = int(batch), int(few), int(many)
me = psutil.Process()
peak = [0]

def rss():
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total

def sample():
    while True:
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
growth = {}

# finetune reads an endless stream: its resident size at step `few` and at step `many` of one run. A first
# run, stopped (Ctrl-C) after a step, compiles the step: a loader that reads ahead without bound would
# otherwise fill up while the step compiles, and not grow after step `few`.
def config(out):
    return TrainConfig(model=model, data=f"{root}/captions.jsonl", out=out, steps=many, batch_size=batch,
                       save_every=10**6, workers=0, warmup_steps=0)
try:
    finetune(config(f"{tmp}/compile"), on_step=lambda record: record["step"] == 1 and os.kill(os.getpid(), signal.SIGINT),
             progress=False)
except Interrupted:
    pass
at_step = {}
def on_step(record):
    time.sleep(0.25)
    if record["step"] in (few, many):
        at_step[record["step"]] = rss()
finetune(config(f"{tmp}/run"), on_step=on_step, progress=False)
growth["finetune few"], growth["finetune many"] = 0, at_step[many] - at_step[few]

# embed reads a finite list: the peak of a run over `few` batches and of one over `many` (same model)
slow_embed = Siglip2Pipeline.embed_preprocessed
def embed_preprocessed(self, *args, **kwargs):
    time.sleep(0.05)
    return slow_embed(self, *args, **kwargs)
Siglip2Pipeline.embed_preprocessed = embed_preprocessed
pipeline = siglip2_jax.load(model, batch_size=batch)
paths = open(f"{root}/all.txt").read().splitlines()
for name, batches in (("compile", 1), ("few", few), ("many", many)):  # the first one compiles the model
    with open(f"{tmp}/list-{name}.txt", "w") as f:
        f.write("\\n".join(paths[: batches * batch]))
    start = peak[0] = rss()
    embed(pipeline, f"{tmp}/list-{name}.txt", f"{tmp}/embed-{name}", batch_size=batch, part_size=batch * many,
          workers=0, progress=False)
    growth[f"embed {name}"] = peak[0] - start
print(json.dumps(growth))
"""


def test_peak_memory_does_not_grow_with_the_number_of_batches(fixres, tmp_path):
    root = tmp_path / "photos"
    paths = write_photos(root, BATCH * MANY, seed=7)
    (root / "all.txt").write_text("\n".join(paths))
    (root / "captions.jsonl").write_text("".join(json.dumps({"image": p, "caption": f"photo {i}"}) + "\n"
                                                 for i, p in enumerate(paths)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(fixres[1]), str(root),
                           str(tmp_path), str(BATCH), str(FEW), str(MANY)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    batch_bytes = BATCH * IMAGE_BYTES
    print(f"\nfinetune: resident size at step {MANY} - at step {FEW}: {growth['finetune many'] / 2**20:.0f} MiB; "
          f"embed: peak above the start over {FEW} batches {growth['embed few'] / 2**20:.0f} MiB, over {MANY} "
          f"batches {growth['embed many'] / 2**20:.0f} MiB; one preprocessed batch is {batch_bytes / 2**20:.1f} MiB")
    for job in ("embed", "finetune"):
        # ten times the batches may hold a few batches more (a run of 4 does not fill what the loader reads
        # ahead, 4 batches, plus the batch on the device and the one being written) and allocator noise:
        # 16 batches. Never ~ten times the batches: grain's default read-ahead gave embed +136..187 MiB and
        # finetune +1344 MiB here.
        extra = growth[f"{job} many"] - growth[f"{job} few"]
        assert extra < 16 * batch_bytes, (job, extra / 2**20)
