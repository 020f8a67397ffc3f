"""Reference models for the parity tests: transformers SigLIP / SigLIP 2 built from configs (never
downloaded), with weights of the size a trained model has, saved with `save_pretrained`."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.initialization import no_init_weights

from siglip2_jax.config import PRESETS_DIR


def preset_hf_config(name: str) -> dict:
    hf = json.loads((PRESETS_DIR / f"{name.split('/')[-1]}.json").read_text())
    hf.pop("_name_or_path", None)
    return hf


def scaled_down(hf: dict, layers: int = 2, heads: int = 2, vocab: int = 1000) -> dict:
    """Same patch size, image size (so the same grid), head_dim and projection pattern; few layers,
    few heads, a small vocabulary. An MLP ratio like the original's (odd widths included)."""
    hf = copy.deepcopy(hf)
    widths = {}
    for tower in ("vision_config", "text_config"):
        t = hf[tower]
        head_dim = t["hidden_size"] // t["num_attention_heads"]
        ratio = t["intermediate_size"] / t["hidden_size"]
        widths[tower] = (t["hidden_size"], heads * head_dim)
        t.update(hidden_size=heads * head_dim, num_attention_heads=heads, num_hidden_layers=layers,
                 intermediate_size=int(round(heads * head_dim * ratio)))
    text = hf["text_config"]
    text["vocab_size"] = vocab
    # the projection keeps its relation to the towers (g-opt: text 1152 -> vision 1536)
    text["projection_size"] = hf["vision_config"]["hidden_size"]
    return hf


def hf_config_object(hf: dict):
    cls = transformers.Siglip2Config if hf["model_type"] == "siglip2" else transformers.SiglipConfig
    return cls(**{k: v for k, v in hf.items() if k != "model_type"})


@torch.no_grad()
def trained_size_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite the default init (whose tiny weights hide errors) with weights of trained magnitude:
    unit-gain linear maps, LayerNorm gains around 1, non-zero biases, unit-scale embeddings, and a
    logit scale and bias like the released models'."""
    g = torch.Generator().manual_seed(seed)

    def randn(p):
        return torch.randn(p.shape, generator=g, dtype=torch.float32)

    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            p.fill_(math.log(112.0))
        elif name.endswith("logit_bias"):
            p.fill_(-12.0)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * randn(p))
        elif name.endswith("probe") or "embedding.weight" in name and "patch" not in name:
            p.copy_(randn(p))
        elif p.ndim == 1:
            p.copy_(0.2 * randn(p))
        else:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(1.2 * randn(p) / math.sqrt(fan_in))
    return model


def make_reference(hf: dict, seed: int = 0, meta: bool = False):
    config = hf_config_object(hf)
    if meta:
        with torch.device("meta"):
            return transformers.AutoModel.from_config(config)
    # trained_size_ writes every parameter, so transformers' own init would be thrown away: skipped (30 s for
    # So400m). The weights are the same either way.
    with no_init_weights():
        model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    return trained_size_(model, seed)


def save_reference(model, directory: Path, max_shard_size=None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory


def convert_reference(hf_dir: Path, out_dir: Path):
    """A saved reference through our converter and back: (config, params) as `siglip2_jax.load` reads them."""
    from siglip2_jax.checkpoint import convert, read_checkpoint_config, restore_params

    convert(hf_dir, out_dir)
    config = read_checkpoint_config(out_dir)
    return config, restore_params(out_dir, config)
