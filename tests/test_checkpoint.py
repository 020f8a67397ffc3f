"""Conversion and checkpoints: strict errors on bad inputs, Orbax round trips, sharded restore, the
conversion program's exit codes and its --verify."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from siglip2_jax.checkpoint import (SourceError, WeightsError, convert, export_hf, is_checkpoint, load_hf_params,
                                    read_checkpoint_config, restore_params)
from siglip2_jax.config import ConfigError
from siglip2_jax.model.build import model_from_params
from siglip2_jax.params import flatten
from siglip2_jax.sharding import make_mesh, param_shardings
from reference import make_reference, preset_hf_config, save_reference, scaled_down

HF = scaled_down(preset_hf_config("siglip2-base-patch32-256"), layers=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    save_reference(make_reference(HF, seed=0), directory)
    return directory


def copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def cli(*args):
    return subprocess.run([sys.executable, "-m", "siglip2_jax.cli", *map(str, args)], capture_output=True, text=True)


def test_truncated_file_is_refused_naming_it(hf_dir, tmp_path):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: truncated"):
        load_hf_params(broken)


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"not a safetensors file at all, just text" * 10,
                                     (16).to_bytes(8, "little") + b"{not json}{{{{{{"])
def test_corrupt_file_is_refused_naming_it(hf_dir, tmp_path, content):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_hf_params(broken)


def _safetensors_with(hf_dir, tmp_path, change):
    """A copy of hf_dir whose model.safetensors header is replaced by change(header) (a dict, or bytes)."""
    import struct

    broken = copy_dir(hf_dir, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = change(json.loads(data[8: 8 + size]))
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data[8 + size:])
    return broken


@pytest.mark.parametrize("change, message", [
    # numpy's product of these dimensions wraps around to 0 bytes, which the header then "has"
    (lambda h: {**h, "logit_bias": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, "0 bytes for shape"),
    (lambda h: {**h, "logit_bias": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [16, 0]}}, "for shape \\(-2, 2\\)"),
    (lambda h: {**h, "logit_bias": {**h["logit_bias"], "dtype": "I32"}}, "logit_bias is stored as int32; weights are floating"),
    (lambda h: b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),  # RecursionError in json
])
def test_lying_header_is_refused_naming_the_file(hf_dir, tmp_path, change, message):
    broken = _safetensors_with(hf_dir, tmp_path, change)
    with pytest.raises(WeightsError, match=r"broken/model\.safetensors: .*" + message):
        load_hf_params(broken)


@pytest.mark.parametrize("index, message", [
    (b'{"weight_map": {"logit_bias": ["model.safetensors"]}}', "weight_map is not"),
    (b'{"weight_map": "\xff"}', "can't decode byte 0xff"),
])
def test_bad_safetensors_index_is_refused_naming_it(hf_dir, tmp_path, index, message):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    (broken / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(WeightsError, match=r"model\.safetensors\.index\.json: not a valid safetensors index \(.*" + message):
        load_hf_params(broken)


def test_orbax_item_without_metadata_is_refused_naming_it(hf_dir, tmp_path):
    out = tmp_path / "ours"
    convert(hf_dir, out)
    (out / "params" / "vision" / "_METADATA").unlink()  # a copy or a deletion stopped half way
    with pytest.raises(ConfigError, match=r"params/vision: no readable Orbax metadata"):
        restore_params(out)


def test_wrong_width_names_key_file_and_both_shapes(hf_dir, tmp_path):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["vision_config"]["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as err:
        load_hf_params(broken)
    message = str(err.value)
    assert "model.safetensors" in message and "mlp.fc1.weight" in message
    mlp, width = HF["vision_config"]["intermediate_size"], HF["vision_config"]["hidden_size"]
    assert f"({mlp}, {width})" in message and f"({mlp + 8}, {width})" in message


@pytest.mark.parametrize("depth_change,match", [(1, r"missing text_model\.encoder\.layers\.2\."),
                                                (-1, r"unexpected key text_model\.encoder\.layers\.1\.")])
def test_wrong_depth_is_refused(hf_dir, tmp_path, depth_change, match):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += depth_change
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=match):
        load_hf_params(broken)


def test_unknown_model_type_is_refused(hf_dir, tmp_path):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ConfigError, match="not a SigLIP"):
        load_hf_params(broken)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin: refusing to load a pickle"):
        load_hf_params(tmp_path)
    with pytest.raises(WeightsError, match="refusing to load a pickle"):
        convert(tmp_path / "pytorch_model.bin", tmp_path / "out")


def test_missing_shard_is_refused(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    save_reference(make_reference(HF, seed=0), sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(WeightsError, match=shards[1].name):
        load_hf_params(sharded)


def test_offline_hub_id_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="pass the local directory"):
        convert("google/not-a-real-siglip2-model", tmp_path / "out")
    # a mistyped local path has a hub id's form: the message must not read as a download problem only
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SourceError, match=r"^ckpt/b16-22: no such file or directory, and could not download"):
        convert("ckpt/b16-22", tmp_path / "out")


def test_orbax_round_trip_is_bitwise(hf_dir, tmp_path):
    config, params = load_hf_params(hf_dir)
    convert(hf_dir, tmp_path / "ours")
    restored = flatten(restore_params(tmp_path / "ours"))
    for path, value in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg=path)
    assert (tmp_path / "ours" / "config.json").exists()
    assert read_checkpoint_config(tmp_path / "ours") == config


def test_bfloat16_storage_keeps_embeddings_float32(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "ours", param_dtype=ml_dtypes.bfloat16)
    restored = flatten(restore_params(tmp_path / "ours"))
    assert restored["vision/encoder/blocks/mlp/fc1_kernel"].dtype == jnp.bfloat16
    assert restored["text/token_embed"].dtype == jnp.bfloat16
    for path in ("vision/embed/patch/kernel", "vision/embed/position", "text/position", "vision/post_norm/scale"):
        assert restored[path].dtype == jnp.float32, path


def test_restore_straight_into_a_mesh_sharding(hf_dir, tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py asks XLA for 8 CPU devices"
    convert(hf_dir, tmp_path / "ours")
    config = read_checkpoint_config(tmp_path / "ours")
    mesh = make_mesh(model_parallel=2)
    shardings = param_shardings(config, mesh)
    sharded = restore_params(tmp_path / "ours", config, shardings)
    single = restore_params(tmp_path / "ours", config)
    fc1 = sharded["vision/encoder/blocks/mlp/fc1_kernel"]
    assert fc1.sharding == shardings["vision/encoder/blocks/mlp/fc1_kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert len(fc1.addressable_shards) == 8 and fc1.addressable_shards[0].data.shape[-1] == fc1.shape[-1] // 2
    for path, value in flatten(single).items():
        np.testing.assert_array_equal(np.asarray(flatten(sharded)[path]), np.asarray(value), err_msg=path)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_standalone_tower_checkpoints(tmp_path, tower):
    import transformers
    from reference import hf_config_object, trained_size_
    full = hf_config_object(HF)
    cls = transformers.SiglipVisionModel if tower == "vision" else transformers.SiglipTextModel
    sub = full.vision_config if tower == "vision" else full.text_config
    torch.manual_seed(0)
    reference = trained_size_(cls(sub).eval())
    reference.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours")
    config = read_checkpoint_config(tmp_path / "ours")
    model = model_from_params(config, restore_params(tmp_path / "ours", config))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        if tower == "vision":
            pixels = rng.uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
            theirs = reference(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
            ours = np.asarray(model.encode_images(jnp.asarray(pixels), normalize=False))
        else:
            ids = rng.integers(0, 1000, (2, 64))
            theirs = reference(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
            ours = np.asarray(model.encode_texts(jnp.asarray(ids), normalize=False))
    assert model.vision is None if tower == "text" else model.text is None
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


# ---- the conversion program -----------------------------------------------------------------------------
def test_convert_cli_verify_passes_and_reports(hf_dir, tmp_path):
    run = cli("convert", hf_dir, tmp_path / "ours", "--verify", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "peak resident memory" in run.stdout
    assert "image embeds" in run.stdout and "logits" in run.stdout and "PASS" in run.stdout


def test_convert_cli_verify_fails_on_a_wrong_conversion(hf_dir, tmp_path):
    src = copy_dir(hf_dir, tmp_path / "src")
    assert cli("convert", src, tmp_path / "ours", "--quiet").returncode == 0
    # change the source weights after conversion: ours no longer equals the reference
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["vision_model.encoder.layers.0.mlp.fc2.bias"][3] += 0.05  # one channel (a uniform shift is invisible after LayerNorm)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    from siglip2_convert.verify import verify
    report = verify(src, tmp_path / "ours")
    assert not report.passed and report.diffs["image embeds"] > 2e-5


def test_convert_cli_bad_input_one_line_exit_2(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"junk")
    for args in [(tmp_path / "model.bin", tmp_path / "o1"), (tmp_path / "nowhere", tmp_path / "o2"), (tmp_path, tmp_path / "o3")]:
        run = cli("convert", *args, "--quiet")
        assert run.returncode == 2, run
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr


def test_convert_cli_refuses_to_overwrite(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    run = cli("convert", hf_dir, tmp_path / "out", "--quiet")
    assert run.returncode == 2 and "--overwrite" in run.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_overwrite_never_replaces_the_source_or_a_folder_that_is_not_a_model(hf_dir, tmp_path):
    """`convert SRC SRC --overwrite` replaced the source; `convert SRC SRC/.. --overwrite` deleted the folder
    holding it (and the run failed after that)."""
    source = copy_dir(hf_dir, tmp_path / "work" / "src")
    before = sorted(p.name for p in source.iterdir())
    with pytest.raises(FileExistsError, match="src: is or holds .*, which is being read"):
        convert(source, source, overwrite=True)
    with pytest.raises(FileExistsError, match="work: not a model directory"):
        convert(source, source / "..", overwrite=True)
    assert sorted(p.name for p in source.iterdir()) == before
    ours = tmp_path / "ours"
    convert(source, ours)
    with pytest.raises(FileExistsError, match="ours: is or holds"):
        export_hf(ours, ours, overwrite=True)
    convert(source, ours, overwrite=True)  # an earlier output is still replaced
    assert is_checkpoint(ours)


def test_cli_help_teaches():
    run = cli("convert", "--help")
    assert run.returncode == 0 and "hub id" in run.stdout and "--verify" in run.stdout and "exit status" in run.stdout
