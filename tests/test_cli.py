"""The `siglip2-jax classify` command on odd-but-valid and broken images, bad arguments, --json, --help."""

from __future__ import annotations

import io
import json

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
    (["--labels", ""], "--labels"),
    (["--labels", "cat", "--template", "no placeholder"], "--template"),
])
def test_bad_arguments_one_line_exit_2(fixres, odd_images, args, needle):
    run = cli("classify", fixres[1], odd_images[0], *args)
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run


def test_unknown_model_one_line_exit_2(tmp_path, odd_images):
    run = cli("classify", "--model", tmp_path / "no-model", odd_images[0], "--labels", "cat")
    assert run.returncode == 2 and "no-model" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run
    offline = cli("classify", odd_images[0], "--labels", "cat")  # the default hub model, offline
    assert offline.returncode == 2 and "google/siglip2-base-patch16-224" in offline.stderr
    assert "local directory" in offline.stderr and "Traceback" not in offline.stderr


def test_help_teaches():
    for args in ([], ["classify"]):
        run = cli(*args, "--help")
        assert run.returncode == 0 and "MODEL" in run.stdout
    assert "exit status" in cli("classify", "--help").stdout


def test_classify_naflex_model_with_budget(tmp_path, tokenizer_model, odd_images):
    from conftest import hf_dir_for

    model_dir = hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model)
    run = cli("classify", model_dir, *odd_images[:4], "--labels", "cat", "dog", "--max-num-patches", "576", "--json")
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)) == 4
