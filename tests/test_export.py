"""`export_hf` / `siglip2-jax export`: our checkpoint -> a Hugging Face directory, checked against
transformers itself (model, tokenizer and image processor loaded from the exported directory)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from conftest import cli, hf_dir_for
from siglip2_jax.checkpoint import convert, export_hf, read_checkpoint_config, restore_params
from siglip2_jax.images import preprocess_fixres, preprocess_naflex
from siglip2_jax.model.build import model_from_params
from siglip2_jax.params import flatten
from siglip2_jax.tokenizer import Tokenizer

EMBED_TOL, LOGIT_TOL = 2e-5, 1e-3
TEXTS = ["a photo of a cat", "two dogs playing in the snow", "", "an old map of the world " * 8]


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def safetensors_tensors(directory) -> dict:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def our_model(checkpoint):
    config = read_checkpoint_config(checkpoint)
    return config, model_from_params(config, restore_params(checkpoint, config))


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@torch.no_grad()
def assert_transformers_agrees(exported, checkpoint, image_inputs, ids):
    """transformers, loaded from the exported directory, vs our model on the same inputs."""
    reference = transformers.AutoModel.from_pretrained(exported, attn_implementation="eager", dtype=torch.float32).eval()
    _, model = our_model(checkpoint)
    if isinstance(image_inputs, dict):   # FixRes dict(pixels=...); NaFlex a NaFlexBatch
        torch_images = dict(pixel_values=torch.from_numpy(image_inputs["pixels"]).permute(0, 3, 1, 2))
        ours_image = model.encode_images(jnp.asarray(image_inputs["pixels"]), normalize=False)
    else:
        torch_images = dict(pixel_values=torch.from_numpy(image_inputs.patches),
                            pixel_attention_mask=torch.from_numpy(image_inputs.mask),
                            spatial_shapes=torch.from_numpy(image_inputs.spatial_shapes).long())
        ours_image = model.encode_images(image_inputs, normalize=False)
    out = reference(input_ids=torch.from_numpy(ids).long(), **torch_images)
    image, text = normalize(ours_image), normalize(model.encode_texts(jnp.asarray(ids), normalize=False))
    logits = np.asarray(model.logits(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32)))
    d = dict(image=np.abs(image - normalize(out.image_embeds.numpy())).max(),
             text=np.abs(text - normalize(out.text_embeds.numpy())).max(),
             logits=np.abs(logits - out.logits_per_image.numpy()).max())
    assert d["image"] <= EMBED_TOL and d["text"] <= EMBED_TOL and d["logits"] <= LOGIT_TOL, d
    return d


@pytest.fixture(scope="module")
def exported(fixres, tmp_path_factory):
    hf_dir, ours = fixres
    out = tmp_path_factory.mktemp("export") / "hf"
    export_hf(ours, out)
    return hf_dir, ours, out


def test_export_fixres_loads_in_transformers_and_matches_ours(exported):
    _, ours, out = exported
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip"
    config = read_checkpoint_config(ours)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    ids = rng.integers(0, config.text.vocab_size, (3, 64)).astype(np.int32)
    print(assert_transformers_agrees(out, ours, dict(pixels=pixels), ids))


def test_convert_then_export_gives_back_the_source_tensors_bit_for_bit(exported):
    hf_dir, _, out = exported
    source, result = safetensors_tensors(hf_dir), safetensors_tensors(out)
    assert sorted(source) == sorted(result)
    for key, value in source.items():
        assert value.dtype == np.float32 and result[key].dtype == value.dtype and result[key].shape == value.shape, key
        assert np.array_equal(result[key], value), key


def test_export_then_convert_gives_back_the_params_bit_for_bit(exported, tmp_path):
    _, ours, out = exported
    convert(out, tmp_path / "again")
    before, after = flatten(restore_params(ours)), flatten(restore_params(tmp_path / "again"))
    assert sorted(before) == sorted(after)
    for path, value in before.items():
        assert np.asarray(after[path]).dtype == np.asarray(value).dtype
        assert np.array_equal(np.asarray(after[path]), np.asarray(value)), path


def test_export_processor_gives_our_token_ids_and_pixels(exported):
    _, ours, out = exported
    # transformers' reference preprocessing is its PIL backend (its torchvision one differs slightly)
    processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    config = read_checkpoint_config(ours)
    # the FixRes recipe: the tokenizer is Gemma's, the caller lowercases and pads to 64
    texts = [t.lower() for t in TEXTS]
    hf_ids = processor.tokenizer(texts, padding="max_length", max_length=64, truncation=True)["input_ids"]
    assert np.array_equal(np.asarray(hf_ids), Tokenizer.from_dir(ours).encode(texts))
    images = random_images([(31, 64), (300, 200), (224, 224)])
    hf_pixels = processor.image_processor([i for i in images], return_tensors="np")["pixel_values"]
    ours_pixels = preprocess_fixres(images, config.vision.image_size)
    assert np.array_equal(hf_pixels.transpose(0, 2, 3, 1), ours_pixels)


def test_export_naflex_sharded_loads_in_transformers(tmp_path, tokenizer_model):
    hf_dir = hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model, seed=2)
    convert(hf_dir, tmp_path / "ours")
    out = export_hf(tmp_path / "ours", tmp_path / "export", max_shard_size="2MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file(), shards
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip2"
    source, result = safetensors_tensors(hf_dir), safetensors_tensors(out)
    assert sorted(source) == sorted(result) and all(np.array_equal(result[k], v) for k, v in source.items())

    images = random_images([(48, 300), (224, 224), (20, 20)], seed=1)
    processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    hf = processor.image_processor(images, return_tensors="np")
    ours = preprocess_naflex(images, 16, 256)
    assert np.array_equal(hf["pixel_values"], ours.patches)
    assert np.array_equal(hf["pixel_attention_mask"], ours.mask)
    assert np.array_equal(hf["spatial_shapes"], ours.spatial_shapes)
    config = read_checkpoint_config(tmp_path / "ours")
    ids = np.random.default_rng(3).integers(0, config.text.vocab_size, (2, 64)).astype(np.int32)
    print(assert_transformers_agrees(out, tmp_path / "ours", ours, ids))


def test_export_cli_writes_and_refuses_bad_input(fixres, tmp_path, capsys):
    from siglip2_jax.cli import main

    _, ours = fixres
    run = cli("export", ours, tmp_path / "hf", "--max-shard-size", "1MB")
    assert run.returncode == 0, run.stderr
    assert "peak resident memory" in run.stdout and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    run = cli("export", tmp_path / "nothing", tmp_path / "a")
    assert run.returncode == 2 and "not a siglip2-jax checkpoint" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr

    for args, needle in [((ours, tmp_path / "hf"), "already exists"),
                         ((ours, tmp_path / "b", "--max-shard-size", "lots"), "max shard size")]:
        capsys.readouterr()
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_finetune_export_hf_writes_a_transformers_directory_of_the_trained_weights(fixres, tmp_path, capsys):
    from PIL import Image

    from siglip2_jax.cli import main

    _, ours = fixres
    (tmp_path / "images").mkdir()
    lines = []
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]):
        Image.new("RGB", (40 + i, 32), color).save(tmp_path / "images" / f"{color}.png")
        lines.append(json.dumps({"image": f"images/{color}.png", "caption": f"a {color} square"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    flags = ["--model", str(ours), "--data", str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "run"),
             "--steps", "2", "--batch-size", "8", "--warmup-steps", "1", "--workers", "0", "--export-hf"]
    assert main(["finetune", *flags]) == 0, capsys.readouterr().err
    assert "model-hf" in capsys.readouterr().out
    trained = safetensors_tensors(tmp_path / "run" / "model-hf")
    exported_again = export_hf(tmp_path / "run" / "model", tmp_path / "again")
    assert all(np.array_equal(v, safetensors_tensors(exported_again)[k]) for k, v in trained.items())
    before = safetensors_tensors(export_hf(ours, tmp_path / "before"))
    assert any(not np.array_equal(v, before[k]) for k, v in trained.items())  # it did train
    model, info = transformers.AutoModel.from_pretrained(tmp_path / "run" / "model-hf", output_loading_info=True)
    assert not any(info.values()), info
