"""big_vision-layout SigLIP 2 `.npz` files made in the test, and a mapping to transformers' tensors that
is independent of ours.

Names and shapes follow big_vision's modules (`models/vit.py`: `embedding` conv HWIO, `pos_embedding`
(1, N, D), `Transformer/encoderblock_{i}` or scanned `encoderblock`, `encoder_norm`, `MAPHead_0`;
`naflex_vit.py`: `embedding` Dense over (py, px, c) patches, `pos_embedding` (16, 16, D);
`text_transformer.py`: `Embed_0`, `pos_embedding` (1, L, D), `Encoder_0`, `head`; `two_towers.py`: `t`, `b`
(1,); flax `MultiHeadDotProductAttention`: query/key/value kernels (D, heads, head_dim), out (heads,
head_dim, D)). Values have the magnitude of a trained model (see reference.trained_size_).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np


def big_vision_arrays(hf: dict, seed: int = 0, scanned: bool = False):
    """(name, float32 array) pairs of a big_vision checkpoint shaped like the HF config dict `hf`,
    one at a time (full-size models need not be held in memory)."""
    rng = np.random.default_rng(seed)
    v, t = hf["vision_config"], hf["text_config"]
    naflex = hf["model_type"] == "siglip2"

    def randn(*shape, scale=1.0, offset=0.0):
        return (offset + scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def dense(name, n_in, n_out):
        return [(f"{name}/kernel", randn(n_in, n_out, scale=1.2 / math.sqrt(n_in))), (f"{name}/bias", randn(n_out, scale=0.2))]

    def norm(name, d):
        return [(f"{name}/scale", randn(d, scale=0.3, offset=1.0)), (f"{name}/bias", randn(d, scale=0.2))]

    def attention(name, d, heads):
        hd = d // heads
        out = []
        for part in ("query", "key", "value"):
            out += [(f"{name}/{part}/kernel", randn(d, heads, hd, scale=1.2 / math.sqrt(d))),
                    (f"{name}/{part}/bias", randn(heads, hd, scale=0.2))]
        return out + [(f"{name}/out/kernel", randn(heads, hd, d, scale=1.2 / math.sqrt(d))), (f"{name}/out/bias", randn(d, scale=0.2))]

    def block(d, mlp, heads):
        return [*norm("LayerNorm_0", d), *attention("MultiHeadDotProductAttention_0", d, heads), *norm("LayerNorm_1", d),
                *dense("MlpBlock_0/Dense_0", d, mlp), *dense("MlpBlock_0/Dense_1", mlp, d)]

    def encoder(prefix, c):
        d, mlp, heads, depth = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_hidden_layers"]
        if not scanned:
            for i in range(depth):
                yield from ((f"{prefix}/encoderblock_{i}/{n}", a) for n, a in block(d, mlp, heads))
        else:
            layers = [block(d, mlp, heads) for _ in range(depth)]
            for j, (n, _) in enumerate(layers[0]):
                yield f"{prefix}/encoderblock/{n}", np.stack([layer[j][1] for layer in layers])
        yield from ((f"{prefix}/{n}", a) for n, a in norm("encoder_norm", d))

    d, p = v["hidden_size"], v["patch_size"]
    if naflex:
        side = int(round(math.sqrt(v.get("num_patches", 256))))
        yield from dense("params/img/embedding", p * p * 3, d)
        yield "params/img/pos_embedding", randn(side, side, d)
    else:
        yield "params/img/embedding/kernel", randn(p, p, 3, d, scale=1.2 / math.sqrt(3 * p * p))
        yield "params/img/embedding/bias", randn(d, scale=0.2)
        yield "params/img/pos_embedding", randn(1, (v["image_size"] // p) ** 2, d)
    yield from encoder("params/img/Transformer", v)
    yield "params/img/MAPHead_0/probe", randn(1, 1, d)
    yield from ((f"params/img/MAPHead_0/{n}", a) for n, a in attention("MultiHeadDotProductAttention_0", d, v["num_attention_heads"]))
    yield from ((f"params/img/MAPHead_0/{n}", a) for n, a in norm("LayerNorm_0", d))
    yield from ((f"params/img/MAPHead_0/{n}", a) for n, a in dense("MlpBlock_0/Dense_0", d, v["intermediate_size"]))
    yield from ((f"params/img/MAPHead_0/{n}", a) for n, a in dense("MlpBlock_0/Dense_1", v["intermediate_size"], d))

    dt = t["hidden_size"]
    yield "params/txt/Embed_0/embedding", randn(t["vocab_size"], dt)
    yield "params/txt/pos_embedding", randn(1, t.get("max_position_embeddings", 64), dt)
    yield from encoder("params/txt/Encoder_0", t)
    yield from dense("params/txt/head", dt, t.get("projection_size", dt))
    yield "params/t", np.full((1,), math.log(112.0), np.float32)
    yield "params/b", np.full((1,), -12.0, np.float32)


def write_npz(path: Path, arrays) -> Path:
    """Write (name, array) pairs as an uncompressed `.npz` (what `np.savez` makes), one at a time."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return path


def hf_state_dict(arrays: dict, hf: dict) -> dict:
    """big_vision arrays -> transformers `Siglip2Model` / `SiglipModel` tensors (numpy), following the key
    correspondence published in transformers' `models/siglip2/convert_siglip2_to_hf.py` (written here from
    it, independently of siglip2_jax.checkpoint). Accepts the per-layer layout only."""
    out = {}
    towers = [("img/Transformer", "vision_model", hf["vision_config"]), ("txt/Encoder_0", "text_model", hf["text_config"])]
    for bv, ours, c in towers:
        d = c["hidden_size"]
        for i in range(c["num_hidden_layers"]):
            b, h = f"params/{bv}/encoderblock_{i}/", f"{ours}.encoder.layers.{i}."
            for n, m in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
                out[f"{h}{m}.weight"], out[f"{h}{m}.bias"] = arrays[f"{b}{n}/scale"], arrays[f"{b}{n}/bias"]
            for n, m in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                out[f"{h}mlp.{m}.weight"] = arrays[f"{b}MlpBlock_0/{n}/kernel"].T
                out[f"{h}mlp.{m}.bias"] = arrays[f"{b}MlpBlock_0/{n}/bias"]
            a = f"{b}MultiHeadDotProductAttention_0/"
            for n, m in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
                out[f"{h}self_attn.{m}.weight"] = arrays[f"{a}{n}/kernel"].reshape(-1, d).T if n == "out" \
                    else arrays[f"{a}{n}/kernel"].reshape(d, -1).T
                out[f"{h}self_attn.{m}.bias"] = arrays[f"{a}{n}/bias"].reshape(-1)
    v = hf["vision_config"]
    kernel = arrays["params/img/embedding/kernel"]
    out["vision_model.embeddings.patch_embedding.weight"] = kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)
    out["vision_model.embeddings.patch_embedding.bias"] = arrays["params/img/embedding/bias"]
    out["vision_model.embeddings.position_embedding.weight"] = arrays["params/img/pos_embedding"].reshape(-1, v["hidden_size"])
    out["vision_model.post_layernorm.weight"] = arrays["params/img/Transformer/encoder_norm/scale"]
    out["vision_model.post_layernorm.bias"] = arrays["params/img/Transformer/encoder_norm/bias"]
    m = "params/img/MAPHead_0/"
    a = f"{m}MultiHeadDotProductAttention_0/"
    d = v["hidden_size"]
    out["vision_model.head.probe"] = arrays[f"{m}probe"]
    out["vision_model.head.attention.in_proj_weight"] = np.concatenate(
        [arrays[f"{a}{n}/kernel"].reshape(d, -1).T for n in ("query", "key", "value")])
    out["vision_model.head.attention.in_proj_bias"] = np.concatenate(
        [arrays[f"{a}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
    out["vision_model.head.attention.out_proj.weight"] = arrays[f"{a}out/kernel"].reshape(-1, d).T
    out["vision_model.head.attention.out_proj.bias"] = arrays[f"{a}out/bias"]
    out["vision_model.head.layernorm.weight"] = arrays[f"{m}LayerNorm_0/scale"]
    out["vision_model.head.layernorm.bias"] = arrays[f"{m}LayerNorm_0/bias"]
    for n, k in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[f"vision_model.head.mlp.{k}.weight"] = arrays[f"{m}MlpBlock_0/{n}/kernel"].T
        out[f"vision_model.head.mlp.{k}.bias"] = arrays[f"{m}MlpBlock_0/{n}/bias"]
    t = hf["text_config"]
    out["text_model.embeddings.token_embedding.weight"] = arrays["params/txt/Embed_0/embedding"]
    out["text_model.embeddings.position_embedding.weight"] = arrays["params/txt/pos_embedding"].reshape(-1, t["hidden_size"])
    out["text_model.final_layer_norm.weight"] = arrays["params/txt/Encoder_0/encoder_norm/scale"]
    out["text_model.final_layer_norm.bias"] = arrays["params/txt/Encoder_0/encoder_norm/bias"]
    out["text_model.head.weight"] = arrays["params/txt/head/kernel"].T
    out["text_model.head.bias"] = arrays["params/txt/head/bias"]
    out["logit_scale"], out["logit_bias"] = arrays["params/t"], arrays["params/b"]
    return {k: np.ascontiguousarray(x) for k, x in out.items()}
