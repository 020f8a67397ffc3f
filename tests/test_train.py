"""Fine-tuning: a tiny model overfits a batch; frozen towers stay bit-identical; FSDP equals plain data
parallel; a run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one; the exported
model loads; captions files, config files and the command's errors; notebook 3 runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

import siglip2_jax
from siglip2_jax import cli
from siglip2_jax.checkpoint import convert, read_checkpoint_config, restore_params
from siglip2_jax.params import flatten
from siglip2_jax.train import TrainConfig, Trainer, finetune, is_decayed, is_trainable
from siglip2_jax.train_data import DataError, read_pairs
from conftest import hf_dir_for, run_notebook

REPO = Path(__file__).parents[1]
SHAPES, COLORS = ("circle", "square", "triangle"), ("red", "green", "blue", "yellow", "purple", "orange")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_model):
    """B/32@256 scaled down (2 layers, width 128, 64 patches) with the test tokenizer, converted."""
    tmp = tmp_path_factory.mktemp("tiny")
    convert(hf_dir_for(tmp, "siglip2-base-patch32-256", tokenizer_model), tmp / "ours")
    return tmp / "ours"


def draw(shape: str, color: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    box = (size * 0.2, size * 0.2, size * 0.8, size * 0.8)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=color)
    elif shape == "square":
        pen.rectangle(box, fill=color)
    else:
        pen.polygon([(size / 2, size * 0.15), (size * 0.85, size * 0.8), (size * 0.15, size * 0.8)], fill=color)
    return image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """18 coloured shapes and their captions: images/ and captions.jsonl."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    lines = []
    for shape in SHAPES:
        for color in COLORS:
            draw(shape, color).save(root / "images" / f"{color}_{shape}.png")
            lines.append(json.dumps({"image": f"images/{color}_{shape}.png", "caption": f"a {color} {shape}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def tiny_params(model_dir):
    config = read_checkpoint_config(model_dir)
    return config, restore_params(model_dir, config)


def fixed_batch(config, n=8, seed=0):
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    return dict(images=rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
                token_ids=rng.integers(4, config.text.vocab_size, (n, 64)).astype(np.int32))


# ---- the math -----------------------------------------------------------------------------------------
# one set of optimizer settings for the tests below that can share it: trainers with the same settings share
# one compiled step
OVERFIT = TrainConfig(steps=40, learning_rate=3e-4, warmup_steps=5, weight_decay=0.0)


def test_a_tiny_model_overfits_a_fixed_batch(tiny_model):
    config, params = tiny_params(tiny_model)
    cfg = OVERFIT
    trainer = Trainer(config, params, cfg)  # all 8 devices: the ring loss
    batch = fixed_batch(config)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(cfg.steps)]
    fall = 1 - losses[-1] / losses[0]
    print(f"\noverfitting 8 pairs on {trainer.mesh.shape['data']} devices: loss {losses[0]:.3f} -> {losses[-1]:.4f} "
          f"({fall:.1%} lower) in {cfg.steps} steps")
    assert fall >= 0.9


@pytest.mark.parametrize("freeze,dtype", [("image", "float32"), ("towers", "bfloat16")])
def test_frozen_parameters_stay_bit_identical(tiny_model, freeze, dtype):
    """LiT (a locked image tower), and training only the heads (here with bfloat16 compute)."""
    config, params = tiny_params(tiny_model)
    before = {k: np.asarray(v) for k, v in flatten(params).items()}
    trainer = Trainer(config, params, TrainConfig(steps=3, learning_rate=1e-3, warmup_steps=0, freeze=freeze, dtype=dtype))
    for _ in range(3):
        trainer.train_step(fixed_batch(config))
    after = {k: np.asarray(v) for k, v in flatten(trainer.params()).items()}
    frozen = [k for k in before if not is_trainable(k, freeze)]
    trained = [k for k in before if is_trainable(k, freeze)]
    assert frozen and trained
    for k in frozen:
        assert after[k].tobytes() == before[k].tobytes(), k
    moved = [k for k in trained if not np.array_equal(after[k], before[k])]
    assert moved == trained
    assert all(v.dtype == np.float32 for v in after.values())  # float32 master weights whatever the compute dtype
    # the optimizer keeps no state for what it never updates
    state_names = {"/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
                   for path, _ in jax.tree_util.tree_leaves_with_path(trainer.opt_state)}
    assert not state_names & set(frozen)


def test_which_parameters_decay_and_train():
    config = siglip2_jax.Siglip2Config.preset("siglip2-base-patch16-224")
    from siglip2_jax.model.build import flat_param_shapes

    names = list(flat_param_shapes(config))
    assert sorted(n for n in names if is_decayed(n)) == sorted([
        "text/encoder/blocks/attn/out_kernel", "text/encoder/blocks/attn/qkv_kernel", "text/encoder/blocks/mlp/fc1_kernel",
        "text/encoder/blocks/mlp/fc2_kernel", "text/head_kernel", "text/token_embed",
        "vision/embed/patch/kernel", "vision/encoder/blocks/attn/out_kernel", "vision/encoder/blocks/attn/qkv_kernel",
        "vision/encoder/blocks/mlp/fc1_kernel", "vision/encoder/blocks/mlp/fc2_kernel",
        "vision/head/attn/out_kernel", "vision/head/attn/qkv_kernel", "vision/head/mlp/fc1_kernel",
        "vision/head/mlp/fc2_kernel"])
    heads = sorted(n for n in names if is_trainable(n, "towers"))
    assert heads[:2] == ["logit_bias", "logit_scale"] and "text/head_kernel" in heads
    assert all(n.startswith("vision/head/") for n in heads if n.startswith("vision/"))
    assert not any(is_trainable(n, "image") for n in names if n.startswith("vision/"))


def test_fsdp_and_model_parallel_equal_plain_data_parallel(tiny_model):
    config, params = tiny_params(tiny_model)
    batch = fixed_batch(config)
    cfg = OVERFIT
    plain = Trainer(config, params, cfg)
    sharded = Trainer(config, params, TrainConfig(**{**cfg.__dict__, "fsdp": True, "model_parallel": 2}))
    kernel = sharded.trainable["vision"]["encoder"]["blocks"]["mlp"]["fc1_kernel"]    # (layers, embed, mlp)
    assert tuple(kernel.sharding.spec) == (None, "data", "model")
    assert sharded.opt_state[1][0].mu["vision"]["encoder"]["blocks"]["mlp"]["fc1_kernel"].sharding == kernel.sharding
    for _ in range(2):  # the second loss is computed with the parameters after the first update
        ours, reference = sharded.train_step(batch), plain.train_step(batch)
        np.testing.assert_allclose(float(ours["loss"]), float(reference["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(ours["grad_norm"]), float(reference["grad_norm"]), rtol=1e-4)
    ours, reference = flatten(sharded.params()), flatten(plain.params())
    worst = max(float(np.abs(np.asarray(ours[k]) - np.asarray(reference[k])).max()) for k in ours)
    print(f"\nFSDP x model parallel 2 vs data parallel: losses agree to 1e-5; after 2 steps max |param diff| "
          f"{worst:.1e} (learning rate {cfg.learning_rate})")
    assert worst <= 0.1 * cfg.learning_rate  # Adam's updates (at most about lr each) agree to a tenth of one


# ---- the job: data, checkpoints, resume, export ---------------------------------------------------------
def run_config(model, data, out, **overrides):
    settings = dict(model=str(model), data=str(data), out=str(out), steps=4, batch_size=8, learning_rate=3e-4,
                    warmup_steps=2, save_every=2, keep=2, workers=0)
    return {**settings, **overrides}


def as_flags(settings):
    return [(f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}")
            for k, v in settings.items()]


def test_killed_run_resumes_bitwise_identical_to_an_uninterrupted_one(tiny_model, shapes, tmp_path, capsys):
    """Also: a failed start leaves OUT untouched; SIGINT stops at the end of a step, saved and logged; every
    step is in metrics.jsonl once; an undecodable image is skipped (--skip-bad-images), recorded and said
    once, and resuming stays exact."""
    data = shapes.parent / "with_a_bad_image.jsonl"  # beside the images its paths are relative to
    (tmp_path / "broken.png").write_bytes(b"")
    data.write_text(shapes.read_text() + json.dumps({"image": str(tmp_path / "broken.png"), "caption": "a bad one"}) + "\n")
    # uninterrupted, in this process; eval on 4 held-out pairs
    settings = run_config(tiny_model, data, tmp_path / "straight", steps=6, eval_holdout=4, skip_bad_images=True)
    result = finetune(TrainConfig(**settings), progress=False)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.evals and 0 <= result.evals[-1]["image_to_text_recall@1"] <= 1
    skipped = [json.loads(line) for line in (tmp_path / "straight" / "skipped_images.jsonl").read_text().splitlines()]
    assert [(r["image"], r["reason"]) for r in skipped] == [(str(tmp_path / "broken.png"), "empty file")], skipped
    assert capsys.readouterr().err.count("skipped: ") == 1

    # a start that fails its checks writes nothing: the corrected command is not refused
    killed = {**settings, "out": str(tmp_path / "killed"), "workers": 1}
    status, _, err = run_cli(capsys, *as_flags({**killed, "batch_size": 64}))
    assert status == 2 and "training pairs are fewer than one batch of 64" in err
    assert not (tmp_path / "killed").exists()

    # the same run in another process, decoding in a worker process, killed (SIGKILL) after step 3 once
    # the (asynchronous) checkpoint of step 2 is complete
    script = textwrap.dedent(f"""
        import os, signal, time
        from siglip2_jax.train import TrainConfig, finetune
        def die_at_3(record):
            if record["step"] == 3:
                for _ in range(600):
                    if os.path.isdir({str(tmp_path / "killed" / "checkpoints" / "2")!r}):
                        break
                    time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)
        finetune(TrainConfig(**{killed!r}), on_step=die_at_3, progress=False)
    """)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert first.returncode == -9, first.stderr[-2000:]
    assert {p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit()} == {"2"}
    assert not (tmp_path / "killed" / "model").exists()
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]

    # resumed by the command, and interrupted by SIGINT (Ctrl-C) in step 3 (the first after the checkpoint):
    # the run stops at the end of a step, logs it, saves it, and says so
    script = textwrap.dedent(f"""
        import os, signal, sys
        from siglip2_jax import cli, train
        run = train.finetune
        def ctrl_c_at_3(record):
            if record["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
        train.finetune = lambda cfg, **kwargs: run(cfg, on_step=ctrl_c_at_3, **kwargs)
        sys.exit(cli.main(["finetune", *{as_flags(killed)!r}]))
    """)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 130, second.stderr[-2000:]
    saved = max(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= saved < 6 and f"interrupted: step {saved} saved in" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, saved + 1))  # step 3 of the killed run dropped, then logged again

    # resumed again by the command, in this process; everything it knows comes from the disk
    status, out, err = run_cli(capsys, *as_flags(killed))
    assert status == 0, err[-2000:]
    assert "resumed" in err and "exported" in out
    straight, resumed = (flatten(restore_params(tmp_path / d / "model")) for d in ("straight", "killed"))
    assert [k for k in straight if np.asarray(straight[k]).tobytes() != np.asarray(resumed[k]).tobytes()] == []
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4, 5, 6]  # each step once
    skipped = (tmp_path / "killed" / "skipped_images.jsonl").read_text().splitlines()
    assert len(skipped) == 1 and (first.stderr + second.stderr + err).count("skipped: ") == 1
    # the same command once more: nothing is left to train, and it says so (it printed "final loss nan")
    status, out, _ = run_cli(capsys, *as_flags(killed))
    assert status == 0, out
    assert out.splitlines()[-1] == f"already trained 6 steps; exported {tmp_path / 'killed' / 'model'}", out

    # the export is an ordinary inference checkpoint, tokenizer included, and it changed
    model = siglip2_jax.load(tmp_path / "straight" / "model")
    assert (tmp_path / "straight" / "model" / "tokenizer.model").exists()
    assert model.zero_shot([draw("circle", "red")], ["red circle", "blue square"], template="a {}").shape == (1, 2)
    original = flatten(restore_params(tiny_model))
    assert not np.array_equal(np.asarray(original["text/head_kernel"]), np.asarray(straight["text/head_kernel"]))

    # resuming with other settings is not the same run: refused, naming the setting
    status, _, err = run_cli(capsys, *as_flags(killed), "--learning-rate=0.001")
    assert status == 2 and "started with --learning-rate 0.0003, now 0.001" in err


def test_an_undecodable_image_stops_the_run_without_skip_bad_images(shapes, tmp_path):
    """The loader, without and with skipping: one error naming the image, or the image left out and recorded."""
    from siglip2_jax.data import ImagePreprocessor
    from siglip2_jax.train_data import Pair, PairTransform, SkippedImages, pair_loader

    (tmp_path / "broken.png").write_bytes(b"")
    pairs = read_pairs(shapes)[:7] + [Pair(tmp_path / "broken.png", "a bad one")]
    transform = PairTransform(ImagePreprocessor(image_size=32), _FakeTokenizer())
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.png'}: empty file"):
        list(zip(range(2), pair_loader(pairs, transform, 4)))
    skipped = SkippedImages(tmp_path / "skipped.jsonl", len(pairs), 4)
    batches = [b for _, b in zip(range(4), pair_loader(pairs, transform, 4, skipped=skipped))]
    assert [b["images"].shape for b in batches] == [(4, 32, 32, 3)] * 4
    assert [json.loads(line)["image"] for line in (tmp_path / "skipped.jsonl").read_text().splitlines()] == \
        [str(tmp_path / "broken.png")]


class _FakeTokenizer:
    def encode(self, texts, max_length):
        return np.zeros((len(texts), max_length), np.int32)


def test_two_processes_equal_one_process(tiny_model, shapes, tmp_path):
    """`finetune --coordinator-address ... --num-processes 2 --process-id I`: two processes of two CPU devices
    each (jax.distributed over gloo on localhost) train on the same global batches as one process does."""
    from test_sharded import _free_port

    settings = run_config(tiny_model, shapes, tmp_path / "one")
    finetune(TrainConfig(**settings), progress=False)
    two = {**settings, "out": str(tmp_path / "two")}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "HF_HUB_OFFLINE": "1"}
    address = f"127.0.0.1:{_free_port()}"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "siglip2_jax.cli", "finetune", *as_flags(two), "--coordinator-address", address,
         "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(2)]
    try:
        logs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (out, err) in zip(processes, logs):
        assert p.returncode == 0, err[-3000:]
    assert "exported" in logs[0][0]
    one, two = (flatten(restore_params(tmp_path / d / "model")) for d in ("one", "two"))
    worst = max(float(np.abs(np.asarray(one[k]) - np.asarray(two[k])).max()) for k in one)
    print(f"\n2 processes x 2 devices vs 1 process x 8 devices, {settings['steps']} steps: max |param diff| {worst:.1e}")
    # the same batches; only the order of the sums differs (4 devices or 8): Adam's updates (about the
    # learning rate each) agree to a tenth of one, as in the FSDP test above
    assert worst <= 0.1 * settings["learning_rate"]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


# ---- captions files ------------------------------------------------------------------------------------
def test_captions_jsonl_and_csv(shapes, tmp_path):
    pairs = read_pairs(shapes)
    assert len(pairs) == 18 and pairs[0].caption == "a red circle" and pairs[0].image.is_file()
    image = pairs[0].image
    (tmp_path / "c.csv").write_text(f'path,caption\n{image},"a red circle, on white"\n\n{image},second\n')
    assert [p.caption for p in read_pairs(tmp_path / "c.csv")] == ["a red circle, on white", "second"]


@pytest.mark.parametrize("name,text,message", [
    ("a.jsonl", '{"image": "x.png", "caption": "c"}\n', r"a.jsonl:1: image x.png not found"),
    ("a.jsonl", '{"image": "IMG"}\n\n{"image": "IMG", "caption": "c"}\n', r"a.jsonl:1: no 'caption' or 'text' field"),
    ("a.jsonl", '{"image": "IMG", "caption": "ok"}\n{"image": "IMG", "caption": "  "}\n', r"a.jsonl:2: the caption of .* is empty"),
    ("a.jsonl", '{"image": "IMG", "caption": "ok"}\nnot json\n', r"a.jsonl:2: not valid JSON"),
    ("a.csv", "file,label\nIMG,cat\n", r"a.csv:1: the header row must name"),
    ("a.csv", 'image,caption\nIMG,a cat\nIMG,a cat, a dog\n', r"a.csv:3: 3 columns, the header has 2"),
    ("a.jsonl", "\n", r"a.jsonl: no image-caption pairs"),
])
def test_captions_errors_name_file_and_line(shapes, tmp_path, name, text, message):
    image = read_pairs(shapes)[0].image
    (tmp_path / name).write_text(text.replace("IMG", str(image)))
    with pytest.raises(DataError, match=message) as error:
        read_pairs(tmp_path / name)
    assert "\n" not in str(error.value)


# ---- the command ---------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    status = cli.main(["finetune", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_command_errors_are_one_line(tiny_model, shapes, tmp_path, capsys):
    base = ["--model", tiny_model, "--out", tmp_path / "out", "--workers", "0"]
    cases = [
        ([*base], "error: --data is required"),
        ([*base, "--data", tmp_path / "none.jsonl"], f"error: {tmp_path / 'none.jsonl'}: no such file"),
        ([*base, "--data", shapes, "--batch-size", "12"], "error: --batch-size 12 is not a multiple of the 8"),
        ([*base, "--data", shapes, "--steps", "0"], "error: --steps 0: must be at least 1"),
        (["--config", tmp_path / "missing.json"], f"error: {tmp_path / 'missing.json'}: no such config file"),
    ]
    (tmp_path / "bad.json").write_text('{"model": "m", "learning_rate": "fast"}')
    cases.append((["--config", tmp_path / "bad.json"], f'error: {tmp_path / "bad.json"}: learning_rate: expected float, got "fast"'))
    (tmp_path / "typo.json").write_text('{"modle": "m"}')
    cases.append((["--config", tmp_path / "typo.json"], "unknown setting 'modle'"))
    for args, expected in cases:
        status, out, err = run_cli(capsys, *args)
        assert status == 2 and expected in err and err.count("\n") == 1, (args, err)
    status, _, err = run_cli(capsys, "--model", tmp_path, "--data", shapes, "--out", tmp_path / "o2")
    assert status == 2 and err.startswith("error:") and err.count("\n") == 1, err


def test_config_file_then_flags(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "data": "d.jsonl", "out": "o", "batch-size": 16,
                                                   "learning_rate": 1, "freeze": "image", "fsdp": True}))
    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "--config", str(tmp_path / "run.json"), "--batch-size", "64"])
    from siglip2_jax.train import config_from_args

    cfg = config_from_args(args)
    assert (cfg.batch_size, cfg.learning_rate, cfg.freeze, cfg.fsdp, cfg.steps) == (64, 1.0, "image", True, 1000)
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    assert "exit status" in help_text and "--freeze" in help_text and "resuming" in help_text


# ---- notebook 3 ----------------------------------------------------------------------------------------
def test_finetune_notebook_runs_top_to_bottom(tiny_model, tmp_path):
    # one CPU device: the notebook's kernel is a process of its own, and that is the fast way for it
    outputs = run_notebook("03_finetune.ipynb", tmp_path, SIGLIP2_MODEL=str(tiny_model),
                           XLA_FLAGS="--xla_force_host_platform_device_count=1")
    print(outputs[-600:])
    assert "loss fell" in outputs and "recall@1 after" in outputs
