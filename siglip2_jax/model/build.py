"""Making models without random init: abstract shapes, and a model from a params tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
    """Build the model around an existing params tree (nested dict of arrays), allocating nothing else."""
    model = abstract_model(config, dtype=dtype, **kw)
    graphdef, state = nnx.split(model)
    expected, given = set(flatten(nnx.to_pure_dict(state))), set(flatten(params))
    if expected != given:
        raise ValueError(f"params do not match the config: missing {sorted(expected - given)[:3]}, "
                         f"unexpected {sorted(given - expected)[:3]}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)
