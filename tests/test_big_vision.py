"""big_vision `.npz` -> our checkpoint, checked against implementations written by others.

FixRes: open_clip reads the same `.npz` with its own `load_big_vision_weights` into its own model (timm
image tower, open_clip text tower). open_clip has no NaFlex model, so NaFlex is checked against
transformers' `Siglip2Model` holding tensors mapped in the test from the key correspondence published
in transformers' `convert_siglip2_to_hf.py` (tests/big_vision_reference.py), and our export of the
converted checkpoint must give exactly those tensors.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from big_vision_reference import big_vision_arrays, hf_state_dict, write_npz
from conftest import cli
from reference import hf_config_object, preset_hf_config, scaled_down
from siglip2_convert.verify import our_outputs, random_inputs, reference_outputs
from siglip2_jax.checkpoint import VARIANTS, WeightsError, convert, export_hf, variant_of
from siglip2_jax.checkpoint import big_vision
from siglip2_jax.config import ConfigError, Siglip2Config

EMBED_TOL = 2e-5
needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                     reason="open_clip (pip install open-clip-torch) is the independent reference")


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embed_diffs(ours: dict, ref: dict) -> dict:
    return {k: float(np.abs(normalize(ours[k]) - normalize(ref[k])).max()) for k in ("image", "text")}


def open_clip_outputs(npz, config, inputs):
    from siglip2_convert.verify import open_clip_outputs as run

    return run(npz, config, inputs)


def small(name: str) -> tuple[dict, Siglip2Config]:
    hf = scaled_down(preset_hf_config(name))
    return hf, Siglip2Config.from_hf(hf)


def npz_arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def exported_tensors(checkpoint, out) -> dict:
    from safetensors.numpy import load_file

    export_hf(checkpoint, out)
    return {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(p).items()}


# ---- FixRes against open_clip -------------------------------------------------------------------------
@needs_open_clip
def test_scaled_down_fixres_matches_open_clip(tmp_path, monkeypatch):
    """B/16@224 scaled down in width but at its full depth (12 blocks: two-digit block names), converted with
    the architecture the file name gives, as `siglip2-jax convert siglip2_b16_224.npz OUT` does."""
    hf = scaled_down(preset_hf_config("siglip2-base-patch16-224"), layers=12)
    config = Siglip2Config.from_hf(hf)
    npz = write_npz(tmp_path / "siglip2_b16_224.npz", big_vision_arrays(hf, seed=5))
    asked = []
    monkeypatch.setattr(big_vision, "variant_config", lambda variant: asked.append(variant) or config)
    convert(npz, tmp_path / "ours")
    assert asked == ["b16_224"]
    monkeypatch.undo()
    inputs = random_inputs(config, batch=3)
    reference = open_clip_outputs(npz, config, inputs)
    d = embed_diffs(our_outputs(tmp_path / "ours", inputs), reference)
    print(f"B/16@224 scaled down (12 blocks) vs open_clip: {d}")
    assert d["image"] <= EMBED_TOL and d["text"] <= EMBED_TOL, d

    # convert -> export gives the tensors transformers' own correspondence makes of the .npz, bit for bit
    expected = hf_state_dict(npz_arrays(npz), hf)
    result = exported_tensors(tmp_path / "ours", tmp_path / "hf")
    assert sorted(result) == sorted(expected)
    assert all(np.array_equal(result[k], v) for k, v in expected.items())

    # the comparison can fail: forget the transpose of the attention output kernels
    monkeypatch.setattr(big_vision, "_heads_out", lambda a: a.reshape(-1, a.shape[-1]))
    convert(npz, tmp_path / "broken", config=config)
    broken = embed_diffs(our_outputs(tmp_path / "broken", inputs), reference)
    assert broken["image"] > 100 * EMBED_TOL and broken["text"] > 100 * EMBED_TOL, broken


# ---- NaFlex against transformers ----------------------------------------------------------------------
@torch.no_grad()
def test_scaled_down_naflex_matches_transformers_with_the_published_mapping(tmp_path):
    hf, config = small("siglip2-base-patch16-naflex")
    npz = write_npz(tmp_path / "siglip2.npz", big_vision_arrays(hf, seed=6))
    convert(npz, tmp_path / "ours", config=config)

    expected = hf_state_dict(npz_arrays(npz), hf)
    reference = __import__("transformers").AutoModel.from_config(hf_config_object(hf), attn_implementation="eager")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=True)
    reference.save_pretrained(tmp_path / "reference")
    inputs = random_inputs(config, batch=3)
    d = embed_diffs(our_outputs(tmp_path / "ours", inputs), reference_outputs(tmp_path / "reference", inputs))
    print(f"NaFlex B/16 scaled down vs transformers (published mapping): {d}")
    assert d["image"] <= EMBED_TOL and d["text"] <= EMBED_TOL, d

    # ...and through our export: exactly the tensors of that mapping
    result = exported_tensors(tmp_path / "ours", tmp_path / "hf")
    assert sorted(result) == sorted(expected)
    assert all(np.array_equal(result[k], v) for k, v in expected.items())

    processor = __import__("transformers").AutoImageProcessor.from_pretrained(tmp_path / "ours")
    assert processor.max_num_patches == 256 and processor.patch_size == 16


# ---- names, tokenizer, preprocessing -------------------------------------------------------------------
def test_variant_names():
    published = ["b16_224", "b16_256", "b16_384", "b16_512", "b32_256", "l16_256", "l16_384", "l16_512",
                 "so400m14_224", "so400m14_384", "so400m16_256", "so400m16_384", "so400m16_512",
                 "g-opt16_256", "g-opt16_384", "b16_naflex", "so400m16_naflex"]  # gs://big_vision/siglip2/
    assert sorted(VARIANTS) == sorted(published)
    for variant in published:
        assert variant_of(f"/data/siglip2_{variant}.npz") == variant
        config = big_vision.variant_config(variant)
        assert config.naflex == variant.endswith("naflex")
    gopt = big_vision.variant_config("g-opt16_384")
    assert (gopt.vision.width, gopt.text.width, gopt.text.projection_size, gopt.vision.image_size) == (1536, 1152, 1536, 384)
    for name in ["siglip2_b16_999.npz", "weights.npz", "siglip2_b16_224_b16_256.npz"]:
        with pytest.raises(ConfigError) as err:
            variant_of(name)
        assert name in str(err.value) and "so400m16_naflex" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_and_preprocessing_files(tmp_path, tokenizer_model):
    import transformers

    import siglip2_jax

    hf, config = small("siglip2-so400m-patch14-384")
    src = tmp_path / "src"
    src.mkdir()
    npz = write_npz(src / "siglip2.npz", big_vision_arrays(hf, seed=7))
    convert(npz, tmp_path / "plain", config=config)                    # no tokenizer anywhere
    assert not (tmp_path / "plain" / "tokenizer.model").exists()
    with pytest.raises(ValueError, match="no tokenizer"):
        siglip2_jax.load(tmp_path / "plain").encode_texts(["a cat"])
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "plain")
    assert (processor.size["height"], processor.size["width"]) == (384, 384)

    convert(npz, tmp_path / "given", config=config, tokenizer=tokenizer_model)
    shutil.copy(tokenizer_model, src / "gemma.model")
    convert(src, tmp_path / "beside", config=config)                   # a directory holding the .npz
    for out in ("given", "beside"):
        assert (tmp_path / out / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
        ids = siglip2_jax.load(tmp_path / out).tokenizer.encode(["a cat"])
        assert ids.shape == (1, 64)


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = scaled_down(preset_hf_config("siglip2-base-patch16-224"), layers=1)
    return hf, Siglip2Config.from_hf(hf), dict(big_vision_arrays(hf, seed=8))


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case, change, needle", [
    ("truncated", None, "truncated"),
    ("missing", lambda a: a.pop("params/txt/head/bias"), "missing params/txt/head/bias"),
    ("extra", lambda a: a.update({"params/img/head/kernel": np.zeros((4, 4), np.float32)}), "unexpected array params/img/head/kernel"),
    ("shape", lambda a: a.update({"params/img/pos_embedding": np.zeros((1, 197, 128), np.float32)}),
     "params/img/pos_embedding has shape (1, 197, 128) but the given architecture needs (1, 196, 128)"),
    ("float64", lambda a: a.update({"params/img/pos_embedding": a["params/img/pos_embedding"].astype(np.float64)}),
     "params/img/pos_embedding is float64, expected float32"),
    ("int", lambda a: a.update({"params/t": np.ones((1,), np.int32)}), "params/t is int32, expected float32"),
    ("pickled", lambda a: a.update({"params/b": np.array([{"x": 1}], dtype=object)}), "params/b is a pickled object array"),
])  # fmt: skip
def test_bad_npz_is_refused_naming_file_and_array(case, change, needle, tiny, tmp_path):
    hf, config, arrays = tiny
    arrays = dict(arrays)
    if change is not None:
        change(arrays)
    path = tmp_path / "siglip2.npz"
    if case == "pickled":
        np.savez(path, **arrays)  # np.savez pickles object arrays
    else:
        write_npz(path, arrays.items())
    if case == "truncated":
        _truncated(path)
    with pytest.raises(WeightsError) as err:
        convert(path, tmp_path / "out", config=config)
    message = str(err.value)
    assert str(path) in message and needle in message and "\n" not in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["siglip2.npz"]  # nothing written, nothing left over


def test_convert_cli_refuses_bad_npz_and_names_in_one_line(tiny, tmp_path, capsys):
    from siglip2_jax.cli import main

    hf, config, arrays = tiny
    (tmp_path / "config.json").write_text(json.dumps(hf))
    bad = dict(arrays)
    bad["params/txt/head/kernel"] = bad["params/txt/head/kernel"][:, :-1]
    write_npz(tmp_path / "siglip2_b16_224.npz", bad.items())
    assert main(["convert", str(tmp_path / "siglip2_b16_224.npz"), str(tmp_path / "out"), "--config",
                 str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "params/txt/head/kernel has shape (128, 127)" in err, err
    assert str(tmp_path / "siglip2_b16_224.npz") in err

    shutil.move(tmp_path / "siglip2_b16_224.npz", tmp_path / "siglip2_x16_224.npz")
    assert main(["convert", str(tmp_path / "siglip2_x16_224.npz"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "names no known big_vision variant" in err and "b16_224" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_convert_verify_without_torch_says_what_to_install_before_converting(fixres, tmp_path):
    # make `import torch` fail in the child process, as on a machine without it
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    hf_dir, _ = fixres
    run = cli("convert", hf_dir, tmp_path / "out", "--verify", env={"PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "pip install torch" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


@needs_open_clip
def test_convert_cli_verify_npz_against_open_clip(tmp_path, tokenizer_model):
    # g-opt: the image tower is wider than the So400m text tower, whose head projects up to it (1536 at
    # full size); its blocks stored scanned (one array per weight, a leading layer axis)
    hf, config = small("siglip2-giant-opt-patch16-256")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    write_npz(tmp_path / "siglip2_g-opt16_256.npz", big_vision_arrays(hf, seed=5, scanned=True))
    run = cli("convert", tmp_path / "siglip2_g-opt16_256.npz", tmp_path / "out", "--config", tmp_path / "config.json",
              "--tokenizer", tokenizer_model, "--verify", "--quiet")
    print(run.stdout)
    assert run.returncode == 0, run.stderr
    assert "open_clip" in run.stdout and "PASS (float32: embeddings max|Δ| <= 2e-05" in run.stdout
    assert "of .npz" in run.stdout and (tmp_path / "out" / "tokenizer.model").is_file()


# ---- full size -----------------------------------------------------------------------------------------
# So400m/14@384 in its full geometry (width 1152, 16 heads of 72, MLP 4304, patch 14 at 384: a 27x27 grid,
# the 256k vocabulary) but SO400M_LAYERS of its 27 layers per tower: the layers are alike and mapped alike,
# the full depth of B/16 (two-digit block names) is the scaled-down test's, and full-depth So400m parity is
# test_full_size's (which builds it once, for all its tests). The conversion's peak is about constant
# (2.45 GiB, the 256k x 1152 embedding and the process), so the file must stay large enough for the 1.5x
# bound to keep its margin: 8 layers make 2.1 GiB (1.2x).
SO400M_LAYERS = 8


@needs_open_clip
@pytest.mark.slow
def test_full_size_matches_open_clip(tmp_path):
    """A full-size random checkpoint of trained magnitude, written and converted one array at a time;
    the conversion's peak memory is measured in its own process."""
    variant = "so400m14_384"
    hf = preset_hf_config(VARIANTS[variant])
    npz = tmp_path / f"siglip2_{variant}.npz"
    for tower in ("vision_config", "text_config"):
        hf[tower]["num_hidden_layers"] = SO400M_LAYERS
    (tmp_path / "config.json").write_text(json.dumps(hf))
    args = ["--config", str(tmp_path / "config.json")]
    try:
        write_npz(npz, big_vision_arrays(hf, seed=9))  # per layer: open_clip re-reads a scanned array for every layer
        run = subprocess.run([sys.executable, "-m", "siglip2_convert", str(npz), str(tmp_path / "ours"), "--quiet", *args],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        print(run.stdout.strip())
        ratio = float(run.stdout.split("GiB (")[1].split("x the")[0])
        assert ratio <= 1.5, run.stdout
        config = Siglip2Config.from_hf(hf)
        assert config.vision.depth == hf["vision_config"]["num_hidden_layers"]
        inputs = random_inputs(config, batch=1)
        reference = open_clip_outputs(npz, config, inputs)
        npz.unlink()
        d = embed_diffs(our_outputs(tmp_path / "ours", inputs), reference)
        print(f"{variant} full size vs open_clip: {d}")
        assert d["image"] <= EMBED_TOL and d["text"] <= EMBED_TOL, d
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
