"""The `siglip2-jax` command: classify on odd-but-valid and broken images, bad arguments of every command
(checked before any model loads), --json, --top, the label forms, --help (fast: no jax), --version."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
from PIL import Image

from conftest import cli, png_header_only


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(gray)
    files = {
        "gray.png": gray, "palette.png": rgb.quantize(16), "alpha.png": rgba, "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen.png": Image.fromarray(rng.integers(0, 65536, (40, 60), dtype=np.uint16)),
        "one_pixel.png": Image.new("RGB", (1, 1), "red"), "strip.png": Image.fromarray(rng.integers(0, 256, (4, 3000, 3), dtype=np.uint8)),
        "photo.webp": rgb, "name with spaces.png": rgb, "café 猫.jpg": rgb,
    }
    for name, image in files.items():
        image.save(root / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    rgb.save(root / "rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (30, 30), c) for c in ("red", "green", "blue")]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return sorted(root.iterdir())


@pytest.fixture(scope="module")
def broken_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    (root / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "text.png").write_text("this is not an image\n")
    (root / "random.bin").write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (root / "dangling.png").symlink_to(root / "no-such-target.png")
    (root / "a directory").mkdir()
    return sorted(root.iterdir())


def test_odd_but_valid_images_are_all_classified(fixres, odd_images):
    run = cli("classify", fixres[1], *odd_images, "--labels", "cat", "dog", "a red square", "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["image"] for r in rows] == [str(p) for p in odd_images]
    for row in rows:
        assert list(row["probabilities"]) == ["cat", "dog", "a red square"]
        assert all(0 <= p <= 1 for p in row["probabilities"].values())


def test_broken_images_each_refused_in_one_line(fixres, odd_images, broken_images):
    run = cli("classify", fixres[1], odd_images[0], *broken_images, "--labels", "cat", "dog", "--json")
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == len(broken_images)
    for path, line in zip(broken_images, lines):
        assert line.startswith("error: ") and str(path) in line, (path, line)
    assert "decompression bomb" in lines[[p.name for p in broken_images].index("bomb.png")]
    assert [r["image"] for r in json.loads(run.stdout)] == [str(odd_images[0])]  # the good one still answered


def test_table_output(fixres, odd_images):
    run = cli("classify", fixres[1], odd_images[0], "--labels", "cat", "dog", "--top", "1")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == str(odd_images[0]) and len(lines) == 2 and "%" in lines[1]


@pytest.mark.parametrize("args,needle", [
    (["--labels", ""], "--labels: label 1 is empty"),
    (["--labels", "cat", ""], "--labels: label 2 is empty"),
    (["--labels", "cat", "--template", "no placeholder"], "--template"),
    (["--labels", "cat", "--template", "a {} and a {}"], "found: {}, {}"),
    (["--labels", "cat", "--template", "a {} of {kind}"], "found: {}, {kind}"),
    (["--labels", "cat", "--template", "a {0}"], "found: {0}"),
    (["--labels", "cat", "--template", "a {} {"], "Single '{'"),
    (["--labels", "cat", "dog", "cat", "--json"], "'cat' is given twice"),
    (["--labels", "cat", "--label", "cat"], "'cat' is given twice"),
    (["--labels", "cat", "--max-num-patches", "0"], "--max-num-patches: 0: must be at least 1"),
    (["--labels", "cat", "--max-num-patches", "-5"], "--max-num-patches: -5: must be at least 1"),
    (["--labels", "cat", "--max-num-patches", "many"], "--max-num-patches: 'many' is not a whole number"),
    (["--labels", "cat", "--top", "0"], "--top: 0: must be at least 1"),
    (["--labels", "cat", "dog", "other.jpg"], "'other.jpg' looks like an image file"),  # swallowed by --labels
])
def test_bad_arguments_one_line_exit_2_before_the_model_loads(tmp_path, odd_images, args, needle):
    # the model does not exist: an argument checked only after loading would be reported as a model error
    run = cli("classify", "--model", tmp_path / "no-model", odd_images[0], *args)
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    assert "no-model" not in run.stderr and "Traceback" not in run.stderr


def test_library_zero_shot_checks_the_template_too(fixres, odd_images):
    import siglip2_jax

    model = siglip2_jax.load(fixres[1])
    for template, found in [("a {} and a {}", "{}, {}"), ("a {} of {kind}", "{}, {kind}")]:
        with pytest.raises(ValueError, match=f"template {template!r}: needs exactly one {{}}.*found: {found}"):
            model.zero_shot([odd_images[0]], ["cat"], template=template)


def test_images_after_labels_are_never_taken_as_labels(tmp_path, odd_images):
    run = cli("classify", "--model", tmp_path / "no-model", "--labels", "cat", "dog", odd_images[0])
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run
    assert f"{str(odd_images[0])!r} looks like an image file" in run.stderr


@pytest.mark.parametrize("args,needle", [
    (["embed", "M", "IN", "OUT", "--batch-size", "0"], "--batch-size: 0"),
    (["embed", "M", "IN", "OUT", "--part-size", "-1"], "--part-size: -1"),
    (["embed", "M", "IN", "OUT", "--max-num-patches", "0"], "--max-num-patches: 0"),
    (["embed", "M", "IN", "OUT", "--model-parallel", "0"], "--model-parallel: 0"),
    (["embed", "M", "IN", "OUT", "--workers", "-1"], "--workers: -1"),
    (["embed", "M", "IN", "OUT", "--num-processes", "0"], "--num-processes: 0"),
    (["embed", "M", "IN", "OUT", "--process-id", "-1"], "--process-id: -1"),
    (["search", "OUT", "query", "--top-k", "0"], "--top-k: 0"),
    (["search", "OUT", "query", "--chunk-rows", "-5"], "--chunk-rows: -5"),
    (["finetune", "--model", "M", "--data", "D", "--out", "O", "--max-num-patches", "0"], "--max-num-patches 0"),
    (["finetune", "--model", "M", "--data", "D", "--out", "O", "--workers", "-2"], "--workers -2"),
])
def test_counts_of_every_command_must_be_positive(tmp_path, args, needle):
    run = cli(*args, cwd=tmp_path)
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    assert not any(tmp_path.iterdir())  # nothing written


def test_json_honours_top(fixres, odd_images, capsys):
    import siglip2_jax
    from siglip2_jax.cli import main
    from siglip2_jax.images import load_image

    labels = ["cat", "dog", "a red square"]
    expected = siglip2_jax.load(fixres[1]).zero_shot([load_image(odd_images[0])], labels)[0]
    best = [labels[i] for i in np.argsort(-expected, kind="stable")[:2]]
    assert main(["classify", str(fixres[1]), str(odd_images[0]), "--labels", *labels, "--json", "--top", "2"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert list(top) == best  # the best two, best first
    np.testing.assert_allclose([top[k] for k in best], [expected[labels.index(k)] for k in best], rtol=1e-6)


@pytest.mark.parametrize("argv", [
    ["IMG", "--labels", "cat", "a red car"],
    ["IMG", "--label", "cat", "--label", "a red car"],
    ["--label", "cat", "--label", "a red car", "IMG"],      # --label never takes the image
    ["--labels", "cat", "a red car", "--", "IMG"],           # -- ends the labels
    ["IMG", "--labels", "cat", "--label", "a red car"],
])
def test_label_forms(argv):
    from siglip2_jax.cli import build_parser

    args = build_parser().parse_args(["classify", *argv])
    assert args.labels == ["cat", "a red car"] and args.inputs == ["IMG"]


def test_unknown_model_one_line_exit_2(tmp_path, odd_images):
    run = cli("classify", "--model", tmp_path / "no-model", odd_images[0], "--labels", "cat")
    assert run.returncode == 2 and "no-model" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    offline = cli("classify", odd_images[0], "--labels", "cat")  # the default hub model, offline
    assert offline.returncode == 2 and "google/siglip2-base-patch16-224" in offline.stderr
    assert "local directory" in offline.stderr and "Traceback" not in offline.stderr
    assert "`hf download google/siglip2-base-patch16-224 --local-dir" in offline.stderr  # huggingface-cli is gone
    # a damaged checkpoint (config.json gone) is the model, named; not an image, with the hub model used instead
    damaged = tmp_path / "damaged"
    (damaged / "params").mkdir(parents=True)
    run = cli("classify", damaged, odd_images[0], "--labels", "cat")
    assert run.returncode == 2 and f"{damaged}: no config.json" in run.stderr and "google/" not in run.stderr, run


def test_mistyped_flag_points_at_the_commands_help(capsys):
    # argparse left the stray flag to the top-level parser, whose --help does not list the command's flags
    from siglip2_jax.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["search", "out/photos", "a dog", "--topk", "3"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("siglip2-jax search: error: unrecognized arguments: --topk 3 "
                                       "(see `siglip2-jax search --help`)\n")


def test_port_out_of_range_is_refused_before_the_model_loads(capsys):
    from siglip2_jax.cli import main

    with pytest.raises(SystemExit):  # it was accepted: the server compiled, said ready, and listened nowhere
        main(["serve", "ckpt/b16-224", "--port", "99999"])
    assert "argument --port: 99999: must be at most 65535" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, needle", [
    ("--max-wait-ms", "inf", "must be at most 60000 ms"),   # overflowed the batcher's wait: its thread died
    ("--max-wait-ms", "1e16", "must be at most 60000 ms"),
    ("--fetch-timeout-s", "1e300", "must be at most 3600 s"),
    ("--body-timeout-s", "inf", "must be at most 3600 s"),
    ("--max-batch-size", "100000", "must be at most 4096"),  # compiled every bucket up to it, for minutes
])
def test_serve_limits_have_an_upper_bound(capsys, flag, value, needle):
    from siglip2_jax.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["serve", "ckpt/b16-224", flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: {value}: {needle}" in capsys.readouterr().err


def test_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    """uvicorn found a taken port only after the model had loaded and compiled, then aborted (SIGABRT)."""
    import socket

    from siglip2_jax.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # no model at this path: the port is checked first, so the model is never looked at
        assert main(["serve", str(tmp_path / "no-model"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err and len(err.splitlines()) == 1, err


def test_every_default_is_in_the_help():
    # serve's --dtype and --fetch-* and convert's --dtype had defaults that only the code told
    import argparse

    from siglip2_jax.cli import build_parser

    unsaid = [(name, action.option_strings[0]) for name, command in build_parser().commands.choices.items()
              for action in command._actions
              if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
              and len(action.choices or ()) != 1 and "default" not in (action.help or "")]
    assert unsaid == []


def test_help_teaches():
    for args in ([], ["classify"]):
        run = cli(*args, "--help")
        assert run.returncode == 0 and "MODEL" in run.stdout
    assert "exit status" in cli("classify", "--help").stdout


HEAVY = ("jax", "jaxlib", "flax", "grain", "orbax", "optax", "torch", "transformers", "tensorflow")

HELP_PROBE = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from siglip2_jax.cli import build_parser
parser = build_parser()
commands = list(parser._subparsers._group_actions[0].choices)
for args in [["--help"]] + [[name, "--help"] for name in commands]:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        parser.parse_args(args)
    assert "usage:" in out.getvalue(), args
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"commands": commands, "heavy": heavy, "seconds": time.perf_counter() - start}))
"""


def test_help_of_every_command_imports_no_jax():
    # `siglip2-jax --help` used to import jax, flax, grain and orbax (~5 s); the heavy modules belong in `run`
    run = subprocess.run([sys.executable, "-c", HELP_PROBE, *HEAVY], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    probe = json.loads(run.stdout)
    print(f"--help of {len(probe['commands'])} commands: {probe['seconds']:.2f} s")
    assert {"convert", "classify", "embed", "search", "finetune"} <= set(probe["commands"])
    assert probe["heavy"] == [], f"building the parser imported {probe['heavy']}"


def test_version_everywhere():
    import siglip2_jax

    version = metadata.version("siglip2-jax")  # what pip installed, from pyproject.toml
    assert siglip2_jax.__version__ == version
    for command in (["-m", "siglip2_jax.cli"], ["-m", "siglip2_jax"]):
        run = subprocess.run([sys.executable, *command, "--version"], capture_output=True, text=True)
        assert run.returncode == 0 and run.stdout.strip() == f"siglip2-jax {version}", run
    run = subprocess.run([sys.executable, "-m", "siglip2_jax", "classify", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--labels" in run.stdout


def test_classify_naflex_model_with_budget(tmp_path, tokenizer_model, odd_images):
    from conftest import hf_dir_for

    model_dir = hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model)
    run = cli("classify", model_dir, *odd_images[:4], "--labels", "cat", "dog", "--max-num-patches", "576", "--json")
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)) == 4
