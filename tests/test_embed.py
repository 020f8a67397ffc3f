"""`siglip2-jax embed`: equal to the pipeline, broken files refused and listed, kill -9 at random moments
then resumed to a bit-identical result, reruns with other options refused, texts, list files, the loader."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

import siglip2_jax
from siglip2_jax.cli import main
from siglip2_jax.data import make_loader
from siglip2_jax.embed import EmbedError, embed, read_embeddings, read_manifest
from siglip2_jax.search import top_k_scores
from siglip2_jax.sharding import make_mesh
from conftest import cli, png_header_only


def write_photos(root: Path, count: int, seed: int = 0, sides: tuple[int, int] = (16, 120)) -> list[str]:
    """JPEGs and PNGs of varied sizes (each side drawn from `sides`), in nested folders; returns their sorted
    absolute paths."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = rng.integers(*sides, 2)
        pixels = (np.cumsum(rng.integers(0, 9, (h, w, 3)), axis=1) % 256).astype(np.uint8)
        path = root / ("nested/deeper" if i % 3 == 0 else "nested" if i % 3 == 1 else "") / f"photo {i:02d}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return root, write_photos(root, 13)


@pytest.fixture(scope="module")
def model8(fixres):
    """The test model on all 8 devices, as the CLI runs it; loaded once (embed takes a loaded pipeline)."""
    return siglip2_jax.load(fixres[1], mesh=make_mesh(1))


def test_embeddings_equal_the_pipeline(fixres, model8, photos, tmp_path):
    root, paths = photos
    result = embed(fixres[1], root, tmp_path / "out", batch_size=4, part_size=6, workers=0, progress=False)
    assert result.complete and result.exit_status == 0 and result.embedded == len(paths)
    stored_paths, stored = read_embeddings(tmp_path / "out")
    assert stored_paths == paths and stored.dtype == np.float32 and stored.shape == (len(paths), 128)
    assert np.abs(stored - model8.encode_images(paths)).max() <= 1e-6
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_parts"] == 3 and manifest["result"] == {"embedded": len(paths), "refused": 0}

    half = embed(model8, root, tmp_path / "half", dtype="float16", batch_size=4, part_size=6, workers=0, progress=False)
    _, stored16 = read_embeddings(half.out)
    assert stored16.dtype == np.float16 and np.abs(stored16.astype(np.float32) - stored).max() <= 1e-3


def test_broken_files_are_listed_with_reasons_and_the_rest_embedded(fixres, tmp_path):
    root = tmp_path / "mixed"
    good = write_photos(root, 5, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "JPEG")
    broken = {"empty.jpg": b"", "truncated.jpg": buffer.getvalue()[: len(buffer.getvalue()) // 2],
              "notes.png": b"this is not an image\n", "bomb.png": png_header_only(100_000, 100_000)}
    for name, data in broken.items():
        (root / name).write_bytes(data)
    (root / "dangling.jpg").symlink_to(root / "no-such-target.jpg")
    code, stderr = _main(["embed", fixres[1], root, tmp_path / "out", "--batch-size", "4", "--part-size", "4",
                          "--workers", "1"])
    assert code == 1, stderr
    paths, array = read_embeddings(tmp_path / "out")
    assert paths == good and np.isfinite(array).all()
    refused = [json.loads(line) for line in (tmp_path / "out" / "refused.jsonl").read_text().splitlines()]
    reasons = {Path(r["path"]).name: r["reason"] for r in refused}
    assert set(reasons) == {*broken, "dangling.jpg"}
    expected = {"empty.jpg": "empty file", "truncated.jpg": "cannot decode", "notes.png": "not an image",
                "bomb.png": "decompression bomb", "dangling.jpg": "dangling symlink"}
    for name, needle in expected.items():
        assert needle in reasons[name], (name, reasons[name])
        assert f"refused: {root / name}: " in stderr
    assert f"embedded {len(good)} of {len(good) + 5} images" in stderr
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "exit status: 0 every input embedded; 1 finished, but some inputs were refused" in help_text.getvalue()


def test_kill_9_at_random_moments_then_resume_is_bit_identical(fixres, model8, tmp_path):
    """SIGKILL the command at seeded random moments (during start-up, and at random points of its progress),
    rerun it each time, and compare with an uninterrupted run: nothing missing, nothing twice, Δ = 0.
    First, Ctrl-C (SIGINT) once a part is done: the command stops within its batch and says what it kept,
    and the next run says how many parts are already done."""
    root = tmp_path / "photos"
    paths = write_photos(root, 40, seed=2)
    args = ["embed", fixres[1], root, None, "--batch-size", "4", "--part-size", "4", "--workers", "1", "--no-progress"]
    baseline = embed(model8, root, tmp_path / "baseline", batch_size=4, part_size=4, workers=0, progress=False)
    assert baseline.complete
    out = tmp_path / "out"
    args[3] = out
    rng = np.random.default_rng(1234)
    num_parts = 10
    kills, parts_at_kill = 0, []
    # moments: one during start-up (a random delay), four once a random number of parts is done (+ a random delay)
    plan = [("delay", rng.uniform(0.2, 3.0))] + [("parts", t) for t in sorted(rng.integers(0, num_parts - 1, 4))]
    # the runs share a compilation cache: start-up is most of a run here
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-m", "siglip2_jax.cli", *map(str, args)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while _parts_done(out) < 1 and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, said = process.communicate(timeout=60)
        kept = _parts_done(out)
        if not (process.returncode == 0 and kept == num_parts):
            break
        # the tiny model wrote its last parts before the signal was handled: a race of this test, not a
        # result; start over (a command that ignored SIGINT would finish all three times and fail below)
        shutil.rmtree(out)
    assert process.returncode == 130 and 1 <= kept < num_parts, (kept, said)
    assert (f"interrupted: {kept} of {num_parts} parts ({4 * kept} embeddings) are saved in {out}; run the same "
            "command to continue") in said.splitlines(), said
    assert "Traceback" not in said
    for how, when in plan:
        process = subprocess.Popen([sys.executable, "-m", "siglip2_jax.cli", *map(str, args)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        children = []
        while process.poll() is None and time.monotonic() - started < 120:
            children = _children(process.pid) or children
            if how == "delay" and time.monotonic() - started >= when:
                break
            if how == "parts" and _parts_done(out) > when:
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.005)
        if process.poll() is not None:  # it finished before this moment came: nothing to kill
            assert process.returncode == 0, process.stderr.read()
            break
        children = _children(process.pid) or children
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        kills += 1
        parts_at_kill.append(_parts_done(out))
        _assert_gone(children)  # decoding workers must not outlive their parent
    assert kills >= 5, parts_at_kill
    assert any(0 < n < num_parts for n in parts_at_kill), parts_at_kill  # some kills landed mid-way
    done_before = _parts_done(out)
    final = cli(*args, env=env)
    assert final.returncode == 0, final.stderr
    assert f"continuing {out}: {done_before} of {num_parts} parts already done" in final.stderr
    got_paths, got = read_embeddings(out)
    want_paths, want = read_embeddings(baseline.out)
    assert got_paths == want_paths == paths and len(set(got_paths)) == len(got_paths)  # none missing, none twice
    assert np.array_equal(got, want)  # bit-identical
    assert not [n for n in os.listdir(out / "parts") if n.startswith(".")]  # no temporaries left
    for name in os.listdir(out / "parts"):
        if name.endswith(".json"):
            json.loads((out / "parts" / name).read_text())  # none torn


def _parts_done(out: Path) -> int:
    try:
        return sum(name.endswith(".json") for name in os.listdir(out / "parts"))
    except FileNotFoundError:
        return 0


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_gone(processes: list[psutil.Process], timeout: float = 10) -> None:
    """Exited (a zombie counts: orphans wait there for a reaper that this container may not have)."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in alive:
        p.kill()
    assert not alive, f"worker processes outlived their killed parent: {alive}"


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_rerun_with_other_model_input_or_options_is_refused(fixres, model8, photos, tmp_path):
    root, _ = photos
    out = tmp_path / "out"
    embed(model8, root, out, batch_size=4, part_size=6, workers=0, progress=False)
    before = {name: (out / "parts" / name).read_bytes() for name in os.listdir(out / "parts")}

    other_model = tmp_path / "other"
    model = siglip2_jax.load(fixres[1])
    model.model.logit_bias[...] = model.model.logit_bias[...] + 1.0
    model.save(other_model)
    grown_input = tmp_path / "grown"
    write_photos(grown_input, 14)  # the same 13 photos and one more
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\n")
    same = ["--batch-size", "4", "--part-size", "6"]
    refusals = [  # (model, input, options): what the manifest must name
        (fixres[1], root, [*same, "--dtype", "float16"], "--dtype float32"),
        (fixres[1], root, [*same, "--compute-dtype", "bfloat16"], "--compute-dtype float32"),
        (fixres[1], root, ["--batch-size", "8", "--part-size", "6"], "--batch-size 4"),
        (fixres[1], root, ["--batch-size", "4", "--part-size", "5"], "--part-size 6"),
        (fixres[1], captions, [*same, "--texts"], "holds image embeddings"),
        (other_model, root, same, "another model"),
        (fixres[1], grown_input, same, "the input changed"),
    ]
    for model_dir, inputs, options, needle in refusals:
        code, err = _main(["embed", model_dir, inputs, out, *options])
        assert code == 2 and err.startswith("error: ") and needle in err, (options, err)
        assert len(err.strip().splitlines()) == 1, err
    assert {name: (out / "parts" / name).read_bytes() for name in os.listdir(out / "parts")} == before
    # an OUT started before --compute-dtype existed ran in float32: continued by default, refused in bf16
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["options"]["compute_dtype"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, err = _main(["embed", fixres[1], root, out, *same])
    assert code == 0 and f"continuing {out}: 3 of 3 parts already done" in err, err
    code, err = _main(["embed", fixres[1], root, out, *same, "--compute-dtype", "bfloat16"])
    assert code == 2 and "was started with --compute-dtype float32, this command gives bfloat16" in err, err
    # without --part-size, an OUT is continued with its own (older OUTs too: the format did not change)
    code, err = _main(["embed", fixres[1], root, out, "--batch-size", "4"])
    assert code == 0 and f"continuing {out}: 3 of 3 parts already done" in err, err
    assert {name: (out / "parts" / name).read_bytes() for name in os.listdir(out / "parts")} == before
    # and a new OUT on CPU gets parts small enough to be saved every minute or two
    assert read_manifest(embed(model8, root, tmp_path / "new", batch_size=4, workers=0, progress=False).out)[
        "options"]["part_size"] == 256

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("mine")
    code, err = _main(["embed", fixres[1], root, tmp_path / "full"])
    assert code == 2 and "not empty" in err and (tmp_path / "full" / "precious.txt").read_text() == "mine"
    code, err = _main(["embed", fixres[1], tmp_path / "nowhere", tmp_path / "o2"])
    assert code == 2 and "nowhere: no such file or folder" in err
    code, err = _main(["embed", tmp_path / "no-model", root, tmp_path / "o3"])
    assert code == 2 and "no-model" in err and len(err.strip().splitlines()) == 1
    code, err = _main(["embed", fixres[1], root, root / "out-inside"])
    assert code == 2 and "inside INPUT" in err


def _main(argv) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up); returns (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def test_bfloat16_compute(fixres, model8, photos, tmp_path):
    """--compute-dtype bfloat16: the pipeline's bf16 path (close to float32, not equal), recorded in the manifest."""
    import jax.numpy as jnp

    root, paths = photos
    code, err = _main(["embed", fixres[1], root, tmp_path / "bf16", "--compute-dtype", "bfloat16", "--batch-size", "4",
                       "--no-progress"])
    assert code == 0, err
    assert read_manifest(tmp_path / "bf16")["options"]["compute_dtype"] == "bfloat16"
    _, stored = read_embeddings(tmp_path / "bf16")
    # the same as a bf16 pipeline on the CLI's mesh, given the same batches
    bf16 = siglip2_jax.load(fixres[1], dtype=jnp.bfloat16, mesh=make_mesh(1))
    _, same = read_embeddings(embed(bf16, root, tmp_path / "api", batch_size=4, workers=0, progress=False).out)
    assert np.array_equal(stored, same)
    fp32 = model8.encode_images(paths)
    assert not np.array_equal(stored, fp32) and (stored * fp32).sum(-1).min() >= 0.999
    with pytest.raises(EmbedError, match="the pipeline given computes in bfloat16"):
        embed(bf16, root, tmp_path / "mixed", compute_dtype="float32", workers=0, progress=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["embed", str(fixres[1]), str(root), str(tmp_path / "f16c"), "--compute-dtype", "float16"])
    assert exit_.value.code == 2 and "--compute-dtype: invalid choice: 'float16'" in err.getvalue()


def test_texts_and_list_files(model8, photos, tmp_path):
    root, paths = photos
    # U+2028 and form feeds stay inside their caption; the byte-order mark of a Windows editor is dropped
    captions = ["a photo of a cat", "", "A DOG", "café crème " * 30, "a photo of a cat", "two\u2028lines\x0cand a feed"]
    (tmp_path / "captions.txt").write_text("\ufeff" + "\n".join(captions) + "\n", encoding="utf-8")
    result = embed(model8, tmp_path / "captions.txt", tmp_path / "texts", texts=True, batch_size=2, part_size=3,
                   workers=0, progress=False)
    names, stored = read_embeddings(result.out)
    assert names == captions and np.abs(stored - model8.encode_texts(captions)).max() <= 1e-6

    listing = tmp_path / "lists" / "some.txt"
    listing.parent.mkdir()
    chosen = [paths[5], paths[0], paths[7]]
    listing.write_text(f"{os.path.relpath(chosen[0], listing.parent)}\n\n{chosen[1]}\n{chosen[2]}\n")
    result = embed(model8, listing, tmp_path / "listed", batch_size=4, part_size=4, workers=0, progress=False)
    listed, stored = read_embeddings(result.out)
    assert listed == chosen and np.abs(stored - model8.encode_images(chosen)).max() <= 1e-6


def test_unfinished_output_is_refused_by_the_reader(model8, photos, tmp_path):
    root, _ = photos
    out = embed(model8, root, tmp_path / "out", batch_size=4, part_size=4, workers=0, progress=False).out
    (out / "parts" / "000001.json").unlink()
    with pytest.raises(EmbedError, match="unfinished"):
        read_embeddings(out)
    paths, array = read_embeddings(out, partial=True)
    assert len(paths) == array.shape[0] == 13 - 4


@pytest.mark.parametrize("damage, reason", [
    (lambda npy, index: npy.write_bytes(npy.read_bytes()[:100]), r"000001\.npy: corrupt part \(EOF"),
    (lambda npy, index: np.save(npy, np.zeros((4, 3), np.float32)), r"000001\.npy: corrupt part \(holds float32 \(4, 3\)"),
    (lambda npy, index: index.write_text("{"), r"000001\.json: corrupt part"),
])
def test_damaged_part_is_refused_by_resume_search_and_reader(model8, photos, tmp_path, damage, reason):
    """A part damaged after it was written (disk, a careless copy): every reader names it and says how to
    redo it; a resumed run refuses it instead of reporting success; the other parts are kept."""
    root, _ = photos
    out = embed(model8, root, tmp_path / "out", batch_size=4, part_size=4, workers=0, progress=False).out
    _, whole = read_embeddings(out)
    with pytest.raises(EmbedError, match=r"-wide embeddings; the query is \(3,\)"):  # a query of another model
        top_k_scores(out, whole[0, :3], 3)
    damage(*(out / "parts" / f"000001.{ext}" for ext in ("npy", "json")))
    with pytest.raises(EmbedError, match=reason + ".*delete 000001.npy and 000001.json"):
        read_embeddings(out)
    with pytest.raises(EmbedError, match=reason):
        top_k_scores(out, whole[0], 3)
    with pytest.raises(EmbedError, match=reason):
        embed(model8, root, out, batch_size=4, part_size=4, workers=0, progress=False)
    for ext in ("npy", "json"):  # as the message says: the part is embedded again, the others kept
        (out / "parts" / f"000001.{ext}").unlink()
    assert embed(model8, root, out, batch_size=4, part_size=4, workers=0, progress=False).exit_status == 0
    assert np.array_equal(read_embeddings(out)[1], whole)


def test_damaged_manifest_is_named(model8, photos, tmp_path):
    root, _ = photos
    out = embed(model8, root, tmp_path / "out", batch_size=4, part_size=8, workers=0, progress=False).out
    manifest = json.loads((out / "manifest.json").read_text())
    for damaged, reason in [({**manifest, "dim": "64"}, 'dim is "64"'), ({**manifest, "options": None}, "options is null"),
                            ([manifest], "not a siglip2-jax-embeddings manifest")]:
        (out / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(EmbedError, match=f"manifest.json: .*{reason}"):
            read_embeddings(out)


def test_disk_full_says_what_is_kept_and_the_same_command_continues(fixres, photos, tmp_path, monkeypatch):
    import errno

    import siglip2_jax.embed as embed_module

    root, _ = photos
    write = embed_module.write_atomic

    def full_at_part_2(path, content):
        if path.name == "000002.npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, content)

    argv = ["embed", fixres[1], root, tmp_path / "out", "--batch-size", "4", "--part-size", "4", "--no-progress"]
    monkeypatch.setattr(embed_module, "write_atomic", full_at_part_2)
    code, err = _main(argv)
    assert code == 2 and err.count("\n") == 1, err
    assert "No space left on device; 2 of 4 parts (8 embeddings) are saved in" in err and "same command to continue" in err
    monkeypatch.setattr(embed_module, "write_atomic", write)
    assert _main(argv)[0] == 0 and len(read_embeddings(tmp_path / "out")[0]) == 13


def test_loader_shards_shuffles_per_epoch_and_workers_change_nothing():
    records = list(range(23))
    shares = [list(make_loader(records, abs, shard=(i, 3))) for i in range(3)]
    assert sorted(sum(shares, [])) == records and sum(map(len, shares)) == 23
    even = [list(make_loader(records, abs, shard=(i, 3), drop_remainder=True)) for i in range(3)]
    assert {len(s) for s in even} == {7}
    epochs = list(make_loader(records, abs, shuffle=True, seed=3, num_epochs=2))
    assert sorted(epochs[:23]) == sorted(epochs[23:]) == records and epochs[:23] != epochs[23:]
    assert epochs == list(make_loader(records, abs, shuffle=True, seed=3, num_epochs=2))
    batched = [np.array(b) for b in make_loader(records, abs, batch_size=5, shuffle=True, seed=3, workers=2)]
    assert [len(b) for b in batched] == [5, 5, 5, 5, 3]
    assert np.concatenate(batched).tolist() == epochs[:23]
