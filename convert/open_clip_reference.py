"""open_clip as an independent reader of big_vision `.npz` checkpoints (FixRes SigLIP 2 only).

    python -m siglip2_convert.open_clip_reference NPZ CONFIG.json INPUTS.npz OUT.npz

builds open_clip's two-tower model (a timm ViT image tower, open_clip's text tower) with the dimensions of
CONFIG.json, loads NPZ with open_clip's own `load_big_vision_weights` (its mapping, not ours), runs it on
INPUTS.npz (`pixels` NHWC float32, `token_ids` int32) and saves `image`, `text` (pooled embeddings,
not normalized), `logit_scale` and `logit_bias` into OUT.npz.

It runs as its own process because open_clip and timm import torchvision at import time, and the
torchvision wheel on PyPI is built for CUDA torch: next to the CPU torch it fails to import, and a
torchvision in the test process would also change which image processors transformers picks. Here,
when torchvision cannot be imported, an empty placeholder package stands in for it: neither the
models nor the weight loader use it (only open_clip's and timm's data transforms do).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

import numpy as np


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _import_open_clip():
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _PlaceholderFinder())
    import open_clip
    import timm
    from open_clip.convert import load_big_vision_weights

    return open_clip, timm, load_big_vision_weights


def build(config, npz: str):
    """open_clip's CustomTextCLIP with `config`'s dimensions, weights from `npz` by open_clip's loader."""
    import torch

    open_clip, timm, load_big_vision_weights = _import_open_clip()
    v, t = config.vision, config.text
    if v.naflex:
        raise ValueError("open_clip has no NaFlex model")

    def ratio(mlp, width):  # timm and open_clip size the MLP as int(width * ratio)
        return (mlp + 0.5) / width

    text_cfg = dict(context_length=t.max_length, vocab_size=t.vocab_size, width=t.width, heads=t.num_heads,
                    layers=t.depth, mlp_ratio=ratio(t.mlp_dim, t.width), no_causal_mask=True, proj_bias=True,
                    pool_type="last", norm_kwargs={"eps": t.layer_norm_eps},
                    act_kwargs={"approximate": "tanh" if t.approximate_gelu else "none"})
    # open_clip's SigLIP 2 configs name a timm model; its dimensions are fixed, so a small placeholder
    # trunk is built and replaced by a timm ViT of this config's size (the SigLIP layout: no class
    # token, MAP pooling, no projection)
    vision_cfg = dict(image_size=v.image_size, timm_model_name="vit_tiny_patch16_224", timm_pool="map", timm_proj="none")
    # built without initialising (every weight comes from the file; filled with NaN first, so one that
    # the loader missed shows up): a full-size random init would take longer than the comparison
    with torch.device("meta"):
        model = open_clip.CustomTextCLIP(embed_dim=t.projection_size, vision_cfg=vision_cfg, text_cfg=text_cfg,
                                         init_logit_bias=-10.0)
        # big_vision's ViT uses the tanh GELU; timm's So400m/B SigLIP entries default to the erf one
        model.visual.trunk = timm.models.vision_transformer.VisionTransformer(
            img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.num_heads,
            mlp_ratio=ratio(v.mlp_dim, v.width), class_token=False, global_pool="map", num_classes=0,
            act_layer="gelu_tanh" if v.approximate_gelu else "gelu")
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    load_big_vision_weights(model, npz)
    unloaded = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_floating_point() and p.isnan().any()]
    if unloaded:
        raise RuntimeError(f"open_clip's loader left {unloaded[:3]} unset")
    return model.eval()


def main(argv=None) -> int:
    import torch

    from siglip2_jax.config import Siglip2Config

    npz, config_path, inputs_path, out_path = argv if argv is not None else sys.argv[1:]
    config = Siglip2Config.from_json(config_path)
    model = build(config, npz)
    inputs = np.load(inputs_path, allow_pickle=False)
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(inputs["pixels"]).permute(0, 3, 1, 2))
        text = model.encode_text(torch.from_numpy(inputs["token_ids"]).long())
    np.savez(out_path, image=image.numpy(), text=text.numpy(), logit_scale=model.logit_scale.detach().numpy(),
             logit_bias=model.logit_bias.detach().numpy())
    return 0


if __name__ == "__main__":
    sys.exit(main())
