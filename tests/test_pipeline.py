"""`siglip2_jax.load` end to end against transformers (processor + tokenizer + model), batching without
recompiles, dense features, save/load, mesh, and the research notebook."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import siglip2_jax
from siglip2_jax import defaults
from siglip2_jax.checkpoint import SourceError
from siglip2_jax.config import ConfigError
from siglip2_jax.sharding import make_mesh
from conftest import hf_dir_for, run_notebook

EMBED_TOL, LOGIT_TOL = 2e-5, 1e-3
TEXTS = ["a photo of a cat", "A PHOTO OF A DOG", "Ein Foto einer Katze", "фотография кошки", "猫的照片", "😀 emoji",
         "", "  whitespace   runs\tand\nnewlines ", "café crème brûlée " * 20]


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(224, 224), (480, 640), (640, 480), (37, 999), (1, 1), (300, 301)]):
        smooth = np.cumsum(rng.integers(0, 9, (h, w, 3)), axis=1) % 256  # not pure noise
        path = root / f"photo {i}.png"
        Image.fromarray(smooth.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def transformers_answers(hf_dir, paths, texts, template=None):
    model = transformers.AutoModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    processor = transformers.SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=2, do_rescale=True,
                                                     rescale_factor=1 / 255, do_normalize=True,
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokenizer = transformers.Siglip2Tokenizer.from_pretrained(hf_dir, add_bos_token=False, add_eos_token=True,
                                                              padding_side="right")
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    texts = [template.format(t) for t in texts] if template else texts
    ids = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    out = model(pixel_values=pixels, input_ids=ids)
    return out.image_embeds.numpy(), out.text_embeds.numpy(), torch.sigmoid(out.logits_per_image).numpy()


@pytest.mark.parametrize("source", ["hf", "orbax"])
def test_end_to_end_equals_transformers(fixres, photo_files, source):
    hf_dir, ours_dir = fixres
    model = siglip2_jax.load(hf_dir if source == "hf" else ours_dir)
    images, texts, _ = transformers_answers(hf_dir, photo_files, TEXTS)
    assert np.abs(model.encode_images(photo_files) - images).max() <= EMBED_TOL
    assert np.abs(model.encode_texts(TEXTS) - texts).max() <= EMBED_TOL
    labels = ["cat", "dog", "Katze"]
    _, _, probs = transformers_answers(hf_dir, photo_files, labels, template="This is a photo of {}.")
    ours = model.zero_shot(photo_files, labels)
    assert ours.shape == (len(photo_files), 3) and np.abs(ours - probs).max() <= LOGIT_TOL


def test_end_to_end_fails_without_lowercasing(fixres, photo_files):
    hf_dir, _ = fixres
    model = siglip2_jax.load(hf_dir)
    from siglip2_jax.tokenizer import Tokenizer

    model.tokenizer = Tokenizer.from_dir(hf_dir, lowercase="none")
    _, reference, _ = transformers_answers(hf_dir, photo_files[:1], ["A PHOTO OF A DOG"])
    assert np.abs(model.encode_texts(["A PHOTO OF A DOG"]) - reference).max() > EMBED_TOL


def test_any_batch_size_compiles_a_few_shapes_once(fixres):
    _, ours_dir = fixres
    model = siglip2_jax.load(ours_dir, batch_size=8)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (50, 60, 3), dtype=np.uint8) for _ in range(21)]
    model.encode_images(pictures[:7])       # the image tower at 4 + 2 + 1 rows (CPU) or 8 (accelerators)
    model.encode_images(pictures[:8])
    after_first = len(compiles)
    assert model.engine.fns["image"]._cache_size() <= 4   # log2(8) + 1 sizes at most: 1, 2, 4, 8
    for n in (7, 5, 8, 6, 3, 1):           # every count up to the batch size: nothing new
        model.encode_images(pictures[:n])
    assert len(compiles) == after_first
    embeds = model.encode_images(pictures)  # 8 + 8 + 5 rows
    assert len(compiles) == after_first and embeds.shape[0] == 21
    np.testing.assert_allclose(embeds[:7], model.encode_images(pictures[:7]), atol=1e-6)


def test_patch_features_fixres(fixres, photo_files):
    model = siglip2_jax.load(fixres[1])
    dense = model.patch_features(photo_files[:2])
    assert dense.features.shape == (2, 196, model.config.vision.width)
    assert dense.mask.all() and (dense.grid == 14).all()
    assert dense.positions[0, 15].tolist() == [1, 1] and dense.positions[0, -1].tolist() == [13, 13]


def test_retrieval_rankings_agree_with_zero_shot(fixres, photo_files):
    model = siglip2_jax.load(fixres[1])
    probs = model.zero_shot(photo_files, ["cat", "dog"], template="{}")
    ranking = model.rank_images("cat", photo_files)
    assert [i for i, _ in ranking] == list(np.argsort(-probs[:, 0], kind="stable"))
    assert np.isclose(ranking[0][1], probs[:, 0].max(), atol=1e-6)
    texts = model.rank_texts(photo_files[0], ["cat", "dog"], top_k=1)
    assert texts[0][0] == int(np.argmax(probs[0]))


def test_save_and_load_again(fixres, photo_files, tmp_path):
    model = siglip2_jax.load(fixres[0])
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").exists()
    again = siglip2_jax.load(tmp_path / "saved")
    np.testing.assert_array_equal(again.encode_images(photo_files[:2]), model.encode_images(photo_files[:2]))
    np.testing.assert_array_equal(again.encode_texts(TEXTS), model.encode_texts(TEXTS))


def test_mesh_equals_single_device(fixres, photo_files):
    single = siglip2_jax.load(fixres[1])
    sharded = siglip2_jax.load(fixres[1], mesh=make_mesh(model_parallel=2))
    assert np.abs(sharded.encode_images(photo_files) - single.encode_images(photo_files)).max() <= 1e-6
    assert np.abs(sharded.encode_texts(TEXTS) - single.encode_texts(TEXTS)).max() <= 1e-6


@pytest.mark.parametrize("mesh", [None, "eight"])
def test_cpu_batches_run_as_calls_of_few_tokens(fixres, photo_files, monkeypatch, mesh):
    """Big batches on CPU run as several calls of at most CPU_TOKENS_PER_CALL tokens per device; the
    result is the same as one call, with the images padded and sharded like one call."""
    mesh = make_mesh() if mesh else None
    whole = siglip2_jax.load(fixres[1], mesh=mesh)
    images, texts = photo_files * 3, TEXTS * 5
    expected_images, expected_texts = whole.encode_images(images), whole.encode_texts(texts)
    monkeypatch.setattr(defaults, "CPU_TOKENS_PER_CALL", 1)   # one row per device per call
    calls = []
    split = siglip2_jax.load(fixres[1], mesh=mesh)
    for kind in ("image", "text"):
        fn = split.engine.fns[kind]
        split.engine.fns[kind] = lambda state, x, fn=fn: calls.append(len(jax.tree.leaves(x)[0])) or fn(state, x)
    assert np.abs(split.encode_images(images) - expected_images).max() <= 1e-6
    assert np.abs(split.encode_texts(texts) - expected_texts).max() <= 1e-6
    per_call = 1 if mesh is None else mesh.shape["data"]
    assert set(calls) == {per_call} and len(calls) > 2


def test_cpu_runs_no_bucket_of_padding(fixres, photo_files, monkeypatch):
    """On CPU the rows past the last full call run as smaller buckets, not padded up to a bigger one:
    7 rows at 4 per call cost calls of 4 + 2 + 1 rows (no padding row), with the embeddings of one call."""
    model = siglip2_jax.load(fixres[1])
    images = (photo_files * 4)[:7]
    expected = model.encode_images(images)
    monkeypatch.setattr(defaults, "CPU_TOKENS_PER_CALL", 4 * model.engine.tokens_per_row["image"])
    assert model.engine.call_sizes("image", 7) == [4, 2, 1]
    assert model.engine.call_sizes("image", 17) == [4, 4, 4, 4, 1]
    assert model.engine.buckets("image", 17) == [1, 2, 4]
    calls = []
    fn = model.engine.fns["image"]
    model.engine.fns["image"] = lambda state, x: calls.append(len(x)) or fn(state, x)
    np.testing.assert_array_equal(model.engine.run("image", model.preprocess(images)), expected)
    assert calls == [4, 2, 1]
    mesh = make_mesh()  # 8 data shards: padding only inside the last call, fewer rows than the shards
    sharded = siglip2_jax.load(fixres[1], mesh=mesh)
    assert sharded.engine.call_sizes("image", 7) == [8] and sharded.engine.call_sizes("image", 33) == [32, 8]


def test_naflex_pipeline(tmp_path, tokenizer_model, photo_files):
    directory = hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model)
    model = siglip2_jax.load(directory, max_num_patches=576)
    assert model.config.naflex
    probs = model.zero_shot(photo_files, ["cat", "dog"])
    assert probs.shape == (len(photo_files), 2) and np.isfinite(probs).all()
    dense = model.patch_features(photo_files[:3])
    assert dense.features.shape[:2] == (3, 576)
    for i, (rows, cols) in enumerate(dense.grid):
        assert dense.mask[i].sum() == rows * cols
        assert dense.positions[i, rows * cols - 1].tolist() == [rows - 1, cols - 1]
        assert (dense.positions[i, rows * cols:] == -1).all()


def test_load_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="nowhere: no such file or directory"):
        siglip2_jax.load(tmp_path / "nowhere")
    with pytest.raises(SourceError, match="pass the local directory"):
        siglip2_jax.load("google/siglip2-base-patch16-224")


def test_a_setting_of_the_other_family_is_refused_not_ignored(fixres, tmp_path, tokenizer_model):
    """A patch budget means nothing to a FixRes model and an input size nothing to a NaFlex one: each is
    refused naming the setting and the one to use, before any weights are read."""
    with pytest.raises(ConfigError, match="max_num_patches=576: .* is a FixRes model, which takes image_size"):
        siglip2_jax.load(fixres[1], max_num_patches=576)
    naflex = hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model)
    with pytest.raises(ConfigError, match="image_size=256: only for FixRes models; NaFlex models take max_num_patches"):
        siglip2_jax.load(naflex, image_size=256)


def test_notebook_runs_top_to_bottom(fixres, tmp_path):
    outputs = run_notebook("01_zero_shot_and_retrieval.ipynb", tmp_path, SIGLIP2_MODEL=str(fixres[1]))
    assert "best label" in outputs


def test_load_a_relative_checkpoint_path(fixres, photo_files, monkeypatch):
    monkeypatch.chdir(fixres[1].parent)
    model = siglip2_jax.load(fixres[1].name)
    assert model.encode_images(photo_files[:1]).shape[0] == 1


@pytest.mark.parametrize("family", ["fixres", "naflex"])
def test_an_embedding_does_not_depend_on_its_batch(family, fixres, tmp_path, tokenizer_model, photo_files):
    """The same image or text gets the same bits alone, in a batch of 2, of 6 or in reverse order (what
    the server promises when requests share a batch); XLA:CPU picks kernels by row count, so this holds
    only because the pooling heads run in fixed row blocks."""
    source = fixres[1] if family == "fixres" else hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model)
    model = siglip2_jax.load(source, batch_size=8)
    together = model.encode_images(photo_files)
    alone = np.concatenate([model.encode_images([p]) for p in photo_files])
    pairs = np.concatenate([model.encode_images(photo_files[i:i + 2]) for i in range(0, len(photo_files), 2)])
    reverse = model.encode_images(photo_files[::-1])[::-1]
    for other in (alone, pairs, reverse):
        assert np.array_equal(together, other)
    texts = model.encode_texts(TEXTS)
    assert np.array_equal(texts, np.concatenate([model.encode_texts([t]) for t in TEXTS]))


def test_bfloat16_holds_its_matmul_weights_in_bfloat16(fixres, photo_files, monkeypatch):
    """load(dtype=bfloat16) keeps the attention/MLP weights in bf16 once instead of casting them at every
    call: the same embeddings bit for bit as the per-call cast, and save() refuses to write rounded weights."""
    import jax.numpy as jnp

    import siglip2_jax.pipeline
    from siglip2_jax.model.build import COMPUTE_DTYPE_PARAMS, params_of

    _, ours_dir = fixres
    model = siglip2_jax.load(ours_dir, dtype=jnp.bfloat16)
    held = params_of(model.model)
    in_bf16 = {k for k, v in held.items() if v.dtype == jnp.bfloat16}
    assert in_bf16 == {k for k in held if COMPUTE_DTYPE_PARAMS.search(k)}
    assert "text/head_kernel" in in_bf16 and any("encoder" in k and k.endswith("fc1_kernel") for k in in_bf16)
    assert held["vision/embed/position"].dtype == jnp.float32 and held["text/token_embed"].dtype == jnp.float32
    monkeypatch.setattr(siglip2_jax.pipeline, "in_compute_dtype", lambda params, dtype: params)
    cast_per_call = siglip2_jax.load(ours_dir, dtype=jnp.bfloat16)
    assert params_of(cast_per_call.model)["text/head_kernel"].dtype == jnp.float32
    assert np.array_equal(model.encode_texts(TEXTS), cast_per_call.encode_texts(TEXTS))
    assert np.array_equal(model.encode_images(photo_files), cast_per_call.encode_images(photo_files))
    with pytest.raises(ValueError, match="bfloat16"):
        model.save(ours_dir.parent / "bf16-save")
