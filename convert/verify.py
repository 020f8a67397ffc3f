"""Certify a conversion: run transformers on the source weights and siglip2-jax on the converted
checkpoint, on the same random pixels and token ids, and report how far apart they are.

torch and transformers are imported here (and in tests) only; the library never needs them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from siglip2_jax.checkpoint import read_checkpoint_config, restore_params
from siglip2_jax.config import Siglip2Config
from siglip2_jax.images import NaFlexBatch
from siglip2_jax.model.build import model_from_params

# fp32 tolerances (issue 2): normalized embeddings, logits. Weights stored in bf16 are held to cosine.
EMBED_TOL, LOGIT_TOL, BF16_MIN_COSINE = 2e-5, 1e-3, 0.999


@dataclasses.dataclass
class Report:
    diffs: dict            # name -> max |ours - reference|
    cosines: dict          # name -> min cosine(ours, reference) over the batch
    passed: bool
    criterion: str
    reference: str = ""    # what the outputs were compared with, when not the source's transformers model

    def lines(self) -> list[str]:
        out = ([f"verification against {self.reference}:"] if self.reference else []) + [f"  {name:<14} max|Δ| {self.diffs[name]:.3e}"
               + (f"   min cosine {self.cosines[name]:.7f}" if name in self.cosines else "") for name in self.diffs]
        return out + [f"  {'PASS' if self.passed else 'FAIL'} ({self.criterion})"]


def random_inputs(config: Siglip2Config, batch: int = 3, seed: int = 0) -> dict:
    """Pixels (NHWC) or NaFlex patches with mixed grid shapes, and token ids over the whole vocabulary."""
    rng = np.random.default_rng(seed)
    inputs = {}
    v = config.vision
    if v is not None and v.naflex:
        n = v.num_positions
        shapes = [(v.grid_size, v.grid_size), (max(1, n // 40), 40 if n >= 40 else 1), (1, min(n, 7))][:batch]
        mask = np.zeros((len(shapes), n), np.int32)
        for i, (h, w) in enumerate(shapes):
            mask[i, : h * w] = 1
        inputs["naflex"] = NaFlexBatch(patches=rng.uniform(-1, 1, (len(shapes), n, v.patch_dim)).astype(np.float32),
                                       mask=mask, spatial_shapes=np.asarray(shapes, np.int32))
    elif v is not None:
        inputs["pixels"] = rng.uniform(-1, 1, (batch, v.image_size, v.image_size, 3)).astype(np.float32)
    if config.text is not None:
        inputs["token_ids"] = rng.integers(0, config.text.vocab_size, (batch, config.text.max_length)).astype(np.int32)
    return inputs


def reference_outputs(hf_dir: str | Path, inputs: dict) -> dict:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(str(hf_dir), attn_implementation="eager", dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        if "pixels" in inputs or "naflex" in inputs:
            if "naflex" in inputs:
                n = inputs["naflex"]
                kwargs = dict(pixel_values=torch.from_numpy(n.patches),
                              pixel_attention_mask=torch.from_numpy(n.mask),
                              spatial_shapes=torch.from_numpy(n.spatial_shapes).long())
            else:
                kwargs = dict(pixel_values=torch.from_numpy(inputs["pixels"]).permute(0, 3, 1, 2))
            images = model.get_image_features(**kwargs) if hasattr(model, "get_image_features") else model(**kwargs)
            out["image"] = images.pooler_output.numpy()
        if "token_ids" in inputs:
            ids = torch.from_numpy(inputs["token_ids"]).long()
            texts = model.get_text_features(input_ids=ids) if hasattr(model, "get_text_features") else model(input_ids=ids)
            out["text"] = texts.pooler_output.numpy()
        if "image" in out and "text" in out:
            zi, zt = (torch.nn.functional.normalize(torch.from_numpy(out[k]), dim=-1) for k in ("image", "text"))
            out["logits"] = (zi @ zt.T * model.logit_scale.exp() + model.logit_bias).numpy()
    return out


def our_outputs(checkpoint_dir: str | Path, inputs: dict) -> dict:
    config = read_checkpoint_config(checkpoint_dir)
    model = model_from_params(config, restore_params(checkpoint_dir, config))
    out = {}
    if "pixels" in inputs or "naflex" in inputs:
        images = inputs.get("naflex", inputs.get("pixels"))
        out["image"] = np.asarray(model.encode_images(images, normalize=False))
    if "token_ids" in inputs:
        out["text"] = np.asarray(model.encode_texts(jnp.asarray(inputs["token_ids"]), normalize=False))
    if "image" in out and "text" in out:
        out["logits"] = np.asarray(model.logits(_normalize(out["image"]), _normalize(out["text"])))
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def compare(ours: dict, reference: dict, bf16_weights: bool = False) -> Report:
    diffs, cosines = {}, {}
    for name in ("image", "text"):
        if name in ours:
            a, b = _normalize(ours[name]), _normalize(reference[name])
            diffs[f"{name} embeds"] = float(np.abs(a - b).max())
            cosines[f"{name} embeds"] = float((a * b).sum(-1).min())
    if "logits" in ours:
        diffs["logits"] = float(np.abs(ours["logits"] - reference["logits"]).max())
    if bf16_weights:
        passed = all(c >= BF16_MIN_COSINE for c in cosines.values())
        criterion = f"weights stored in bfloat16: embedding cosine >= {BF16_MIN_COSINE}"
    else:
        passed = all(d <= (LOGIT_TOL if n == "logits" else EMBED_TOL) for n, d in diffs.items())
        criterion = f"float32: embeddings max|Δ| <= {EMBED_TOL:g}, logits max|Δ| <= {LOGIT_TOL:g}"
    return Report(diffs, cosines, passed, criterion)


def verify(hf_dir: str | Path, checkpoint_dir: str | Path, bf16_weights: bool = False, batch: int = 3) -> Report:
    inputs = random_inputs(read_checkpoint_config(checkpoint_dir), batch)
    return compare(our_outputs(checkpoint_dir, inputs), reference_outputs(hf_dir, inputs), bf16_weights)


def open_clip_outputs(npz: str | Path, config: Siglip2Config, inputs: dict) -> dict:
    """open_clip's model on `inputs`, its weights read from `npz` by open_clip's own big_vision loader
    (run in a child process: see open_clip_reference.py)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(config.to_hf()))
        np.savez(tmp / "inputs.npz", pixels=inputs["pixels"], token_ids=inputs["token_ids"])
        run = subprocess.run([sys.executable, "-m", "siglip2_convert.open_clip_reference", str(npz), str(tmp / "config.json"),
                              str(tmp / "inputs.npz"), str(tmp / "out.npz")], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"the open_clip reference failed: {run.stderr.strip().splitlines()[-1:]}")
        with np.load(tmp / "out.npz", allow_pickle=False) as ref:
            out = {k: ref[k] for k in ref.files}
    zi, zt = _normalize(out["image"]), _normalize(out["text"])
    out["logits"] = zi @ zt.T * np.exp(out["logit_scale"].astype(np.float64)) + out["logit_bias"].astype(np.float64)
    return {k: out[k] for k in ("image", "text", "logits")}


def verify_big_vision(npz: str | Path, checkpoint_dir: str | Path, bf16_weights: bool = False, batch: int = 3) -> Report:
    """Certify a `.npz` conversion. FixRes: against open_clip reading the `.npz` itself. NaFlex (open_clip
    has none): against transformers on the checkpoint exported to HF format, which checks the model and
    the export but not the `.npz` mapping (the tests check that against transformers' published one)."""
    import tempfile

    from siglip2_jax.checkpoint import export_hf

    config = read_checkpoint_config(checkpoint_dir)
    inputs = random_inputs(config, batch)
    ours = our_outputs(checkpoint_dir, inputs)
    if not config.naflex:
        report = compare(ours, open_clip_outputs(npz, config, inputs), bf16_weights)
        report.reference = "open_clip's big_vision loader and model (float32)"
        return report
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(checkpoint_dir, Path(tmp) / "hf")
        report = compare(ours, reference_outputs(Path(tmp) / "hf", inputs), bf16_weights)
    report.reference = "transformers on the checkpoint exported to HF format (open_clip has no NaFlex model)"
    return report
