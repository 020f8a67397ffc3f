"""Sharded inference: 8 devices (data, and data x model) equal one device; two processes x two devices
(jax.distributed over gloo on localhost) equal one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import siglip2_jax
from siglip2_jax.embed import embed, read_embeddings
from siglip2_jax.model import attention
from siglip2_jax.sharding import make_mesh
from conftest import hf_dir_for
from test_embed import write_photos

TOLERANCE = 1e-6


def embed_on(mesh, model_dir, root, out, **kwargs):
    options = dict(batch_size=8, part_size=8, workers=0, progress=False) | kwargs
    result = embed(model_dir, root, out, mesh=mesh, **options)
    assert result.complete and result.exit_status == 0
    return read_embeddings(out)


@pytest.mark.parametrize("grouped_attention", [False, True])
def test_eight_devices_equal_one(fixres, tmp_path, monkeypatch, grouped_attention):
    assert len(jax.devices()) == 8
    if grouped_attention:   # the CPU loop over (image, head) pairs, with the batch and heads sharded
        monkeypatch.setattr(attention, "LOGITS_BYTES_ONE_STEP", 0)
        monkeypatch.setattr(attention, "LOGITS_BYTES_PER_STEP", 1)
    root = tmp_path / "photos"
    paths = write_photos(root, 12, seed=3)
    one_paths, one = embed_on(make_mesh(1, jax.devices()[:1]), fixres[1], root, tmp_path / "one")
    data_paths, data = embed_on(make_mesh(1), fixres[1], root, tmp_path / "data", workers=2)  # decoded by workers
    both_paths, both = embed_on(make_mesh(model_parallel=2), fixres[1], root, tmp_path / "both")
    assert one_paths == data_paths == both_paths == paths
    assert np.abs(data - one).max() <= TOLERANCE
    assert np.abs(both - one).max() <= TOLERANCE
    assert json.loads((tmp_path / "both" / "manifest.json").read_text())["options"]["model_parallel"] == 2


def test_naflex_eight_devices_equal_one_and_the_pipeline(tokenizer_model, tmp_path):
    model_dir = hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model)
    root = tmp_path / "photos"
    paths = write_photos(root, 6, seed=4)
    _, one = embed_on(make_mesh(1, jax.devices()[:1]), model_dir, root, tmp_path / "one", max_num_patches=64)
    _, eight = embed_on(make_mesh(1), model_dir, root, tmp_path / "eight", max_num_patches=64)
    assert np.abs(eight - one).max() <= TOLERANCE
    reference = siglip2_jax.load(model_dir, max_num_patches=64).encode_images(paths)
    assert np.abs(one - reference).max() <= TOLERANCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(fixres, tmp_path):
    root = tmp_path / "photos"
    paths = write_photos(root, 21, seed=5)
    (root / "broken.jpg").write_bytes(b"not an image")
    options = ["--batch-size", "4", "--part-size", "4", "--workers", "0", "--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "HF_HUB_OFFLINE": "1"}
    address = f"127.0.0.1:{_free_port()}"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "siglip2_jax.cli", "embed", str(fixres[1]), str(root), str(tmp_path / "two"), *options,
         "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, log in zip(processes, logs):
        assert p.returncode == 1, log  # one input refused
        assert "Traceback" not in log
    # the broken file is read, and refused, by the one process whose share it is in
    assert sum("refused: " in log for log in logs) == 1

    result = embed(fixres[1], root, tmp_path / "one", mesh=make_mesh(1, jax.devices()[:2]), batch_size=4,
                   part_size=4, workers=0, progress=False)
    assert result.complete and len(result.refused) == 1
    one_paths, one = read_embeddings(tmp_path / "one")
    two_paths, two = read_embeddings(tmp_path / "two")
    assert two_paths == one_paths == paths and len(set(two_paths)) == len(two_paths)  # same rows, none twice
    assert np.abs(two - one).max() <= TOLERANCE
    writers = [json.loads((tmp_path / "two" / "parts" / f"{k:06d}.json").read_text())["process"] for k in range(6)]
    assert writers == [0, 1, 0, 1, 0, 1]  # the parts were dealt round robin
    refused = (tmp_path / "two" / "refused.jsonl").read_text().splitlines()
    assert len(refused) == 1 and "broken.jpg" in refused[0]
