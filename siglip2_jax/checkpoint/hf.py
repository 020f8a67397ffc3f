"""HF transformers checkpoints (SiglipModel / Siglip2Model and their standalone towers) -> our params.

`key_table(config)` is the one place that says which HF tensor becomes which of our parameters and how.
Loading checks everything (missing and unexpected keys, every shape) from the file headers before it
reads a byte of data, then reads one tensor at a time into preallocated arrays: peak memory is about the
size of the result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ConfigError, Siglip2Config
from ..model.build import flat_param_shapes
from .safetensors_reader import HFCheckpoint, WeightsError


# ---- how an HF tensor becomes ours ----------------------------------------------------------------
def _same(ts):
    return ts[0]


def _linear(ts):                # torch Linear (out, in) -> kernel (in, out)
    return ts[0].T


def _stack_linear(ts):          # q, k, v (out, in) each -> (in, 3, out)
    return np.stack([t.T for t in ts], axis=1)


def _stack(ts):                 # q, k, v biases (out,) each -> (3, out)
    return np.stack(ts)


def _conv_as_linear(ts):        # conv OIHW -> (py, px, c, out): our patch vectors are (py, px, c)
    return ts[0].transpose(2, 3, 1, 0)


# ...and back (export): each conversion's exact inverse, given the HF shape and number of HF tensors
_INVERSE = {
    _same: lambda v, shape, n: [v.reshape(shape)],
    _linear: lambda v, shape, n: [v.reshape(shape[::-1]).T],
    _stack_linear: lambda v, shape, n: [w.T for w in v.reshape(shape[1], n, shape[0]).transpose(1, 0, 2)],
    _stack: lambda v, shape, n: list(v.reshape(n, *shape)),
    _conv_as_linear: lambda v, shape, n: [v.reshape(shape[2], shape[3], shape[1], shape[0]).transpose(3, 2, 0, 1)],
}


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str                        # our parameter path
    hf: tuple[str, ...]              # HF keys it is made from; "{i}" is the layer index
    hf_shape: tuple[int, ...]        # the shape each of those HF tensors must have
    convert: Callable = _same        # HF tensors -> our layout (then reshaped to our shape, same size)
    layers: int = 0                  # > 0: one HF tensor set per layer, stacked on a leading axis


def _encoder_rules(ours: str, hf: str, width: int, mlp: int, depth: int) -> list[Rule]:
    layer = f"{hf}encoder.layers.{{i}}."
    blocks = f"{ours}/encoder/blocks/"
    attn = [f"{layer}self_attn.{n}_proj" for n in "qkv"]
    rules = [
        Rule("attn/qkv_kernel", tuple(f"{a}.weight" for a in attn), (width, width), _stack_linear),
        Rule("attn/qkv_bias", tuple(f"{a}.bias" for a in attn), (width,), _stack),
        Rule("attn/out_kernel", (f"{layer}self_attn.out_proj.weight",), (width, width), _linear),
        Rule("attn/out_bias", (f"{layer}self_attn.out_proj.bias",), (width,)),
        Rule("mlp/fc1_kernel", (f"{layer}mlp.fc1.weight",), (mlp, width), _linear),
        Rule("mlp/fc1_bias", (f"{layer}mlp.fc1.bias",), (mlp,)),
        Rule("mlp/fc2_kernel", (f"{layer}mlp.fc2.weight",), (width, mlp), _linear),
        Rule("mlp/fc2_bias", (f"{layer}mlp.fc2.bias",), (width,)),
    ]
    for n in (1, 2):
        rules += [Rule(f"norm{n}/scale", (f"{layer}layer_norm{n}.weight",), (width,)),
                  Rule(f"norm{n}/bias", (f"{layer}layer_norm{n}.bias",), (width,))]
    return [dataclasses.replace(r, ours=blocks + r.ours, layers=depth) for r in rules]


def _norm_rules(ours: str, hf: str, width: int) -> list[Rule]:
    return [Rule(f"{ours}/scale", (f"{hf}.weight",), (width,)), Rule(f"{ours}/bias", (f"{hf}.bias",), (width,))]


def key_table(config: Siglip2Config, vision_prefix: str = "vision_model.", text_prefix: str = "text_model.") -> list[Rule]:
    """Every HF tensor of a checkpoint with this config, and the parameter of ours it becomes."""
    rules: list[Rule] = []
    v = config.vision
    if v is not None:
        prefix, width = vision_prefix, v.width
        if v.naflex:
            patch = Rule("vision/embed/patch/kernel", (f"{prefix}embeddings.patch_embedding.weight",), (width, v.patch_dim), _linear)
        else:
            patch = Rule("vision/embed/patch/kernel", (f"{prefix}embeddings.patch_embedding.weight",),
                         (width, v.num_channels, v.patch_size, v.patch_size), _conv_as_linear)
        head = f"{prefix}head."
        rules += [
            patch,
            Rule("vision/embed/patch/bias", (f"{prefix}embeddings.patch_embedding.bias",), (width,)),
            Rule("vision/embed/position", (f"{prefix}embeddings.position_embedding.weight",), (v.num_positions, width)),
            *_encoder_rules("vision", prefix, width, v.mlp_dim, v.depth),
            *_norm_rules("vision/post_norm", f"{prefix}post_layernorm", width),
            Rule("vision/head/probe", (f"{head}probe",), (1, 1, width)),
            # nn.MultiheadAttention packs [Wq; Wk; Wv] as rows of one (3D, D) matrix
            Rule("vision/head/attn/qkv_kernel", (f"{head}attention.in_proj_weight",), (3 * width, width), _linear),
            Rule("vision/head/attn/qkv_bias", (f"{head}attention.in_proj_bias",), (3 * width,)),
            Rule("vision/head/attn/out_kernel", (f"{head}attention.out_proj.weight",), (width, width), _linear),
            Rule("vision/head/attn/out_bias", (f"{head}attention.out_proj.bias",), (width,)),
            *_norm_rules("vision/head/norm", f"{head}layernorm", width),
            Rule("vision/head/mlp/fc1_kernel", (f"{head}mlp.fc1.weight",), (v.mlp_dim, width), _linear),
            Rule("vision/head/mlp/fc1_bias", (f"{head}mlp.fc1.bias",), (v.mlp_dim,)),
            Rule("vision/head/mlp/fc2_kernel", (f"{head}mlp.fc2.weight",), (width, v.mlp_dim), _linear),
            Rule("vision/head/mlp/fc2_bias", (f"{head}mlp.fc2.bias",), (width,)),
        ]
    t = config.text
    if t is not None:
        prefix, width = text_prefix, t.width
        rules += [
            Rule("text/token_embed", (f"{prefix}embeddings.token_embedding.weight",), (t.vocab_size, width)),
            Rule("text/position", (f"{prefix}embeddings.position_embedding.weight",), (t.max_length, width)),
            *_encoder_rules("text", prefix, width, t.mlp_dim, t.depth),
            *_norm_rules("text/final_norm", f"{prefix}final_layer_norm", width),
            Rule("text/head_kernel", (f"{prefix}head.weight",), (t.projection_size, width), _linear),
            Rule("text/head_bias", (f"{prefix}head.bias",), (t.projection_size,)),
        ]
    if v is not None and t is not None:
        rules += [Rule("logit_scale", ("logit_scale",), (1,)), Rule("logit_bias", ("logit_bias",), (1,))]
    return rules


def hf_keys(rule: Rule) -> list[list[str]]:
    """The HF keys of a rule, one list per layer (a single list for unstacked rules)."""
    if not rule.layers:
        return [list(rule.hf)]
    return [[k.format(i=i) for k in rule.hf] for i in range(rule.layers)]


def hf_shapes(config: Siglip2Config) -> dict[str, tuple[int, ...]]:
    """{HF key: shape} of a full checkpoint with this config."""
    return {key: rule.hf_shape for rule in key_table(config) for keys in hf_keys(rule) for key in keys}


# ---- loading ---------------------------------------------------------------------------------------
def read_hf_config(directory: str | Path) -> Siglip2Config:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ConfigError(f"{directory}: no config.json (is this a Hugging Face model directory?)")
    return Siglip2Config.from_json(path)


def _detect_prefixes(config: Siglip2Config, keys: set[str]) -> tuple[str, str]:
    """Full models prefix each tower; standalone towers saved by transformers >= 5 do not, older ones do."""
    if config.vision is not None and config.text is not None:
        return "vision_model.", "text_model."
    vision = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    text = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
    return vision, text


def load_hf_params(directory: str | Path, config: Siglip2Config | None = None, *, param_dtype=np.float32,
                   progress: bool = False) -> tuple[Siglip2Config, dict]:
    """Read a HF model dir into (config, flat params of numpy arrays, stacked layout)."""
    config, leaves = iter_hf_params(directory, config, param_dtype=param_dtype, progress=progress)
    return config, dict(leaves)


def iter_hf_params(directory: str | Path, config: Siglip2Config | None = None, *, param_dtype=np.float32,
                   progress: bool = False):
    """(config, iterator of (our param path, numpy array)), one parameter at a time, so a caller can
    write each away before the next is read.

    Strict: a key the config expects but the files lack, a key the files have but the config does not
    explain, or a shape that differs is a `WeightsError` naming the key, the file and both shapes; all
    of it is checked from the file headers before the iterator is returned.
    """
    directory = Path(directory)
    config = config if config is not None else read_hf_config(directory)
    checkpoint = HFCheckpoint(directory)
    return config, iter_checkpoint_params(checkpoint, config, _detect_prefixes(config, set(checkpoint.keys())),
                                          param_dtype=param_dtype, progress=progress, where=directory)


def iter_checkpoint_params(checkpoint, config: Siglip2Config, prefixes=("vision_model.", "text_model."), *,
                           param_dtype=np.float32, progress: bool = False, where="the checkpoint"):
    """Iterator of (our param path, numpy array) from any object with HF tensor names (`HFCheckpoint`,
    `big_vision.BigVisionCheckpoint`: keys, shape, dtype, read, read_into, file_of), checked first."""
    available = set(checkpoint.keys())
    table = key_table(config, *prefixes)
    targets = flat_param_shapes(config, param_dtype)

    expected = {key for rule in table for keys in hf_keys(rule) for key in keys}
    missing = sorted(expected - available)
    if missing:
        raise WeightsError(f"{where}: missing {missing[0]} ({len(missing)} missing keys in all): "
                           f"the weights do not match config.json")
    unexpected = sorted(available - expected)
    if unexpected:
        raise WeightsError(f"{checkpoint.file_of(unexpected[0])}: unexpected key {unexpected[0]} "
                           f"({len(unexpected)} unexpected in all): the weights do not match config.json")
    for rule in table:
        for keys in hf_keys(rule):
            for key in keys:
                if tuple(checkpoint.shape(key)) != rule.hf_shape:
                    raise WeightsError(f"{checkpoint.file_of(key)}: {key} has shape {tuple(checkpoint.shape(key))} "
                                       f"but config.json implies {rule.hf_shape}")
                if np.dtype(checkpoint.dtype(key)).kind in "biu":  # integers would be cast to weights silently
                    raise WeightsError(f"{checkpoint.file_of(key)}: {key} is stored as {checkpoint.dtype(key)}; "
                                       f"weights are floating point (a damaged or foreign file?)")

    def leaves():
        rules = table
        if progress:
            from tqdm.auto import tqdm
            rules = tqdm(table, desc="converting", unit="tensor")
        for rule in rules:
            target = targets[rule.ours]
            out = np.empty(target.shape, target.dtype)
            if rule.convert is _same and not rule.layers and checkpoint.dtype(rule.hf[0]) == out.dtype:
                checkpoint.read_into(rule.hf[0], out)  # the big embedding tables: no temporary copy
            else:
                for i, keys in enumerate(hf_keys(rule)):
                    value = rule.convert([checkpoint.read(k) for k in keys])
                    (out[i] if rule.layers else out)[...] = value.reshape(out.shape[1:] if rule.layers else out.shape)
            yield rule.ours, out

    return leaves()


# ---- our params -> HF tensors (export) -------------------------------------------------------------
def iter_hf_tensors(config: Siglip2Config, params: dict, rules: list[Rule] | None = None):
    """(HF key, numpy array in HF layout) for every tensor of a full HF checkpoint (or of `rules`, a part
    of `key_table(config)`), made from our flat params (stacked layout) by running the table backwards:
    the result is bit-identical to the tensors the params were converted from. One tensor at a time, so a
    caller can write each away; views where the layout allows."""
    for rule in rules if rules is not None else key_table(config):
        value = np.asarray(params[rule.ours])
        for i, keys in enumerate(hf_keys(rule)):
            tensors = _INVERSE[rule.convert](value[i] if rule.layers else value, rule.hf_shape, len(keys))
            yield from zip(keys, tensors)
