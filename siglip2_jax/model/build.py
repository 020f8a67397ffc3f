"""Making models without random init: abstract shapes, and a model from a params tree."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ..config import Siglip2Config
from .siglip import Siglip2


def abstract_model(config: Siglip2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, **kw) -> Siglip2:
    """The model with `jax.ShapeDtypeStruct` leaves: every shape, no memory, no init."""
    return nnx.eval_shape(lambda: Siglip2(config, dtype=dtype, param_dtype=param_dtype, **kw))


def flat_param_shapes(config: Siglip2Config, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{"vision/encoder/blocks/attn/qkv_kernel": ShapeDtypeStruct, ...}."""
    state = nnx.state(abstract_model(config, param_dtype=param_dtype), nnx.Param)
    return {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def flat_param_axes(config: Siglip2Config) -> dict[str, tuple]:
    state = nnx.state(abstract_model(config), nnx.Param)
    return {"/".join(map(str, path)): var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}


def nest(flat: dict[str, object]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        out.update(flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def model_from_params(config: Siglip2Config, params: dict, *, dtype=jnp.float32, **kw) -> Siglip2:
    """Build the model around an existing params tree (nested dict of arrays), allocating nothing else.
    The encoder layout follows the params: stacked ("encoder/blocks/...") or per layer ("encoder/layers/i/...")."""
    given = set(flatten(params))
    kw.setdefault("stacked_layers", not any(_LAYER.search(path) for path in given))
    model = abstract_model(config, dtype=dtype, **kw)
    graphdef, state = nnx.split(model)
    expected = set(flatten(nnx.to_pure_dict(state)))
    if expected != given:
        raise ValueError(f"params do not match the config: missing {sorted(expected - given)[:3]}, "
                         f"unexpected {sorted(given - expected)[:3]}")
    nnx.replace_by_pure_dict(state, _with_int_keys(jax.tree.map(jnp.asarray, params)))
    return nnx.merge(graphdef, state)


_STACKED = re.compile(r"^(.*/encoder)/blocks/(.*)$")
_LAYER = re.compile(r"^(.*/encoder)/layers/(\d+)/(.*)$")


def unstack_layers(flat: dict) -> dict:
    """Flat params with stacked encoder blocks -> one entry per layer, in place and returned.

    "vision/encoder/blocks/mlp/fc1_kernel" (depth, ...) becomes "vision/encoder/layers/{i}/mlp/fc1_kernel".
    Each stacked array is popped before the next is sliced, so when `flat` holds the only reference the
    extra memory is one array, not one encoder. Sharded arrays keep their sharding on the other axes."""
    for path in [p for p in flat if _STACKED.match(p)]:
        encoder, rest = _STACKED.match(path).groups()
        for i, layer in enumerate(_split_layers(flat.pop(path))):
            flat[f"{encoder}/layers/{i}/{rest}"] = layer
    return flat


def stack_layers(flat: dict) -> dict:
    """The inverse of `unstack_layers` (numpy or jax arrays), returning a new flat dict."""
    out, layers = {}, {}
    for path, value in flat.items():
        match = _LAYER.match(path)
        if match is None:
            out[path] = value
        else:
            encoder, i, rest = match.groups()
            layers.setdefault(f"{encoder}/blocks/{rest}", {})[int(i)] = value
    for path, per_layer in layers.items():
        values = [per_layer[i] for i in range(len(per_layer))]
        out[path] = np.stack(values) if isinstance(values[0], np.ndarray) else jnp.stack(values)
    return out


def _split_layers(stacked) -> list:
    """The layers of a stacked array, each placed like the stacked one minus its leading axis.
    Sliced on the host (no compilation: eager indexing would compile one program per layer and shape,
    ~10 s of cold start at So400m); arrays spread over several hosts go through one compiled split."""
    sharding = getattr(stacked, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    if sharding is not None and not getattr(stacked, "is_fully_addressable", True):
        split = jax.jit(lambda a: [a[i] for i in range(a.shape[0])], out_shardings=[sharding] * stacked.shape[0])
        return split(stacked)
    host = np.asarray(stacked)
    return [jax.device_put(layer, sharding) if sharding is not None else layer for layer in host]


def _with_int_keys(tree):
    """nest() makes every key a string; nnx.List children are indexed by int."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _with_int_keys(v) for k, v in tree.items()}
