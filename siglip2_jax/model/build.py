"""Making models without random init: abstract shapes, and a model from flat params (the NNX edge of
`siglip2_jax.params`: the only place where flat params become NNX state and back)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import Siglip2Config
from ..params import Layout, layout_of
from .siglip import Siglip2


def abstract_model(config: Siglip2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, **kw) -> Siglip2:
    """The model with `jax.ShapeDtypeStruct` leaves: every shape, no memory, no init."""
    return nnx.eval_shape(lambda: Siglip2(config, dtype=dtype, param_dtype=param_dtype, **kw))


def params_of(model: nnx.Module) -> dict:
    """A model's parameters as flat params, in the model's own layout: {"vision/encoder/blocks/...": array}."""
    return {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_param_shapes(config: Siglip2Config, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{"vision/encoder/blocks/attn/qkv_kernel": ShapeDtypeStruct, ...}, in the stacked layout."""
    return params_of(abstract_model(config, param_dtype=param_dtype))


def flat_param_specs(config: Siglip2Config) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """{path: (shape, logical axes)} of every parameter, in the stacked layout, from one abstract model."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return {"/".join(map(str, path)): (var.get_value().shape, var.get_metadata()["axes"])
            for path, var in nnx.to_flat_state(state)}


# The parameters the towers only ever read cast to the compute dtype: the attention and MLP weights of
# every block and of the MAP head (`layers.Attention`, `layers.Mlp`) and the text head. Patch and position
# embeddings, the token table, norms and the logit scale/bias are read in float32 whatever the dtype.
COMPUTE_DTYPE_PARAMS = re.compile(r"(/(attn|mlp)/(qkv|out|fc1|fc2)_(kernel|bias)|^text/head_(kernel|bias))$")


def in_compute_dtype(params: dict, dtype) -> dict:
    """Flat params with the COMPUTE_DTYPE_PARAMS already in `dtype` (the rest as they are). The outputs are
    the same bit for bit as casting at every use, without the cast: for bfloat16 on CPU, 1.7x faster at
    batch 1 (the cast of every weight cost as much as the matmuls) and half the weights' memory."""
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return {key: value.astype(dtype) if COMPUTE_DTYPE_PARAMS.search(key) else value for key, value in params.items()}


def model_from_params(config: Siglip2Config, params: dict, *, dtype=jnp.float32, **kw) -> Siglip2:
    """Build the model around existing flat params (`siglip2_jax.params`), allocating nothing else.
    The encoder layout follows the params (`layout_of`). Raises ValueError when the paths do not match
    the config's."""
    kw.setdefault("stacked_layers", layout_of(params) is Layout.STACKED)
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, **kw))
    variables = {"/".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(state)}
    if variables.keys() != params.keys():
        raise ValueError(f"params do not match the config: missing {sorted(variables.keys() - params.keys())[:3]}, "
                         f"unexpected {sorted(params.keys() - variables.keys())[:3]}")
    return nnx.merge(graphdef, nnx.from_flat_state([(path, var.replace(jnp.asarray(params[key])))
                                                    for key, (path, var) in variables.items()]))
