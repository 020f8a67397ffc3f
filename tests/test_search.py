"""`siglip2-jax search`: the same ranking as brute force, chunked top-k exact at every chunk size, image
queries, the CLI and its errors, and notebook 2 (sharded embedding, then search) run top to bottom."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import siglip2_jax
from siglip2_jax.embed import embed, read_embeddings
from siglip2_jax.embed_store import EmbedError
from siglip2_jax.search import search, top_k_scores
from test_embed import write_photos
from conftest import run_notebook


@pytest.fixture(scope="module")
def model(fixres):
    return siglip2_jax.load(fixres[1])


@pytest.fixture(scope="module")
def collection(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collection")
    paths = write_photos(tmp / "photos", 14, seed=6)
    embed(model, tmp / "photos", tmp / "out", batch_size=4, part_size=4, workers=0, progress=False)
    return tmp / "out", paths


def test_text_search_equals_brute_force(model, collection):
    out, paths = collection
    hits = search(out, "a photo of a cat", top_k=6, chunk_rows=3, model=model)
    stored_paths, stored = read_embeddings(out)
    scores = stored @ model.encode_texts(["a photo of a cat"])[0]
    order = np.argsort(-scores, kind="stable")[:6]
    assert [h.path for h in hits] == [stored_paths[i] for i in order]
    assert np.abs(np.array([h.score for h in hits]) - scores[order]).max() <= 1e-6
    assert [h.index for h in hits] == [paths.index(stored_paths[i]) for i in order]
    probabilities = dict(model.rank_images("a photo of a cat", paths))  # the pipeline's sigmoid(logits)
    for hit in hits:
        assert abs(hit.probability - probabilities[hit.index]) <= 1e-6


def test_image_search_finds_the_image_itself(fixres, collection):
    out, paths = collection
    hits = search(out, image=paths[3], top_k=3)  # the model is the one the manifest names
    assert hits[0].path == paths[3] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].probability is None  # image -> image: a cosine, no calibrated probability


def test_chunked_top_k_is_exact_for_every_chunk_size(tmp_path):
    """A synthetic OUT written by hand from the documented format: float16 parts, an empty part, ties."""
    rng = np.random.default_rng(0)
    sizes, dim = [5, 0, 7, 3, 6], 8
    (tmp_path / "parts").mkdir()
    rows, position = [], 0
    for part, size in enumerate(sizes):
        array = rng.normal(size=(size, dim)).astype(np.float16)
        if part == 3:
            array[:] = rows[0]  # exact ties with the first row
        np.save(tmp_path / "parts" / f"{part:06d}.npy", array)
        index = {"part": part, "indices": list(range(position, position + size)),
                 "paths": [f"item{position + i}" for i in range(size)], "refused": [], "process": 0}
        (tmp_path / "parts" / f"{part:06d}.json").write_text(json.dumps(index))
        rows.extend(array)
        position += size
    manifest = {"format": "siglip2-jax-embeddings", "format_version": 1, "kind": "image", "dim": dim,
                "num_parts": len(sizes), "options": {"dtype": "float16"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    table = np.array(rows, np.float32)
    query = rows[0].astype(np.float32)
    scores = table @ query
    expected = np.lexsort((np.arange(len(scores)), -scores))  # by score, ties in listing order
    for chunk_rows in (1, 2, 4, 1000):
        for k in (1, 4, 30):
            got_scores, parts, part_rows = top_k_scores(tmp_path, query, k, chunk_rows=chunk_rows)
            starts = np.cumsum([0] + sizes)
            assert (starts[parts] + part_rows).tolist() == expected[:k].tolist(), (chunk_rows, k)
            assert np.allclose(got_scores, scores[expected[:k]], atol=1e-5)
    # such a manifest names no model: searching it needs one, and says so instead of a KeyError
    with pytest.raises(EmbedError, match=f"{tmp_path / 'manifest.json'}: names no model"):
        search(tmp_path, "a red circle")


def test_a_hand_written_manifest_searches_with_the_model_given(fixres, tmp_path):
    """No model recorded, so nothing to check it against: the model given is used (here: its width is not OUT's)."""
    (tmp_path / "parts").mkdir()
    manifest = {"format": "siglip2-jax-embeddings", "format_version": 1, "kind": "image", "dim": 8, "num_parts": 0,
                "options": {"dtype": "float32"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbedError, match="holds 8-wide embeddings"):
        search(tmp_path, "a red circle", model=fixres[1])


def _main(argv) -> tuple[int, str, str]:
    from siglip2_jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse's refusal of a bad argument
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def test_cli_table_json_and_errors(fixres, collection, tmp_path):
    out, paths = collection
    run = subprocess.run([sys.executable, "-m", "siglip2_jax.cli", "search", str(out), "a red circle", "--top-k", "3",
                          "--json"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(r["path"] in paths for r in rows)
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"] and 0 <= rows[0]["probability"] <= 1

    code, table, _ = _main(["search", out, "--image", paths[0], "--top-k", "2"])
    lines = table.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split()[:2] == ["1", "+1.0000"] and lines[0].endswith(paths[0])

    moved = tmp_path / "other"
    model = siglip2_jax.load(fixres[1])
    model.model.logit_bias[...] = model.model.logit_bias[...] + 1.0
    model.save(moved)
    (tmp_path / "empty").mkdir()
    for argv, needle in [
        ([tmp_path / "empty", "a cat"], "not an embed output"),
        ([out, "a cat", "--image", paths[0]], "QUERY or --image"),
        ([out], "QUERY or --image"),
        ([out, "a cat", "--top-k", "0"], "argument --top-k: 0: must be at least 1"),   # refused by argparse
        ([out, "a cat", "--model", moved], "not the model this OUT was embedded with"),
        ([out, "--image", tmp_path / "missing.jpg"], "missing.jpg: no such file"),
    ]:
        code, _, err = _main(["search", *argv])
        assert code == 2 and "error: " in err.splitlines()[0] and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert "exit status" in _help("search") and "exit status" in _help("embed")


def _help(command: str) -> str:
    from siglip2_jax.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def test_notebook_02_runs_top_to_bottom(fixres, tmp_path):
    outputs = run_notebook("02_sharded_embedding_and_search.ipynb", tmp_path, SIGLIP2_MODEL=str(fixres[1]),
                           SIGLIP2_OUT=str(tmp_path / "out"), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert "8 devices" in outputs and "top matches" in outputs
    paths, embeddings = read_embeddings(tmp_path / "out")
    assert len(paths) == embeddings.shape[0] > 0
