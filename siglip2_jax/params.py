"""The one params form: a flat dict from "/"-joined parameter paths to arrays, and its encoder layout.

    {"vision/embed/patch/kernel": (p*p*c, D), "vision/encoder/blocks/mlp/fc1_kernel": (depth, D, M), ...}

This is the form that passes between modules (checkpoint readers and writers, sharding, the pipeline,
training). Nested trees exist only at the two framework edges: Orbax items (`checkpoint/orbax_io.py`)
and NNX state (`model/build.py`).

The encoder blocks of both towers come in one of two layouts (`Layout`): stacked on a leading axis
(checkpoints and training, which run them with `lax.scan`) or one entry per layer (inference, where a
compiled scan would copy each layer's weights out of the stacked array on every call). `to_layout` is
the one conversion between them; it is applied once, where params are loaded for a purpose.
"""

from __future__ import annotations

import enum
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class Layout(enum.Enum):
    """Where an encoder's blocks live in a params dict.

    STACKED: "<tower>/encoder/blocks/<name>", one array per parameter of the block, (depth, ...).
    PER_LAYER: "<tower>/encoder/layers/<i>/<name>", one array per layer and parameter."""

    STACKED = "stacked"
    PER_LAYER = "per_layer"


_STACKED = re.compile(r"^(.*/encoder)/blocks/(.*)$")
_LAYER = re.compile(r"^(.*/encoder)/layers/(\d+)/(.*)$")


def layout_of(params: dict) -> Layout:
    """The encoder layout of flat params. Raises ValueError for params that mix the two."""
    stacked = any(_STACKED.match(path) for path in params)
    per_layer = any(_LAYER.match(path) for path in params)
    if stacked and per_layer:
        raise ValueError("params mix stacked (encoder/blocks/...) and per-layer (encoder/layers/i/...) encoder entries")
    return Layout.PER_LAYER if per_layer else Layout.STACKED


def to_layout(params: dict, layout: Layout) -> dict:
    """Flat params (numpy or jax arrays) converted to `layout` in place, and returned; a no-op when they
    already are in it.

    To PER_LAYER: "vision/encoder/blocks/mlp/fc1_kernel" (depth, ...) becomes
    "vision/encoder/layers/{i}/mlp/fc1_kernel". Each stacked array is popped before the next is sliced, so
    when `params` holds the only reference the extra memory is one array, not one encoder. Sharded arrays
    keep their sharding on the other axes.
    To STACKED: the inverse; per-layer entries are popped as each parameter is stacked."""
    if layout_of(params) is layout:
        return params
    if layout is Layout.PER_LAYER:
        for path in [p for p in params if _STACKED.match(p)]:
            encoder, name = _STACKED.match(path).groups()
            for i, layer in enumerate(_split_layers(params.pop(path))):
                params[f"{encoder}/layers/{i}/{name}"] = layer
        return params
    stacks: dict[str, list[str]] = {}
    for path in params:
        match = _LAYER.match(path)
        if match is not None:
            encoder, i, name = match.groups()
            stacks.setdefault(f"{encoder}/blocks/{name}", []).append((int(i), path))
    for path, layers in stacks.items():
        values = [params.pop(p) for _, p in sorted(layers)]
        params[path] = np.stack(values) if isinstance(values[0], np.ndarray) else jnp.stack(values)
    return params


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


def nest(params: dict) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}: the tree a framework edge (an Orbax item) wants."""
    tree: dict = {}
    for path, value in params.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """The inverse of `nest` (keys of any type are joined as strings); flat params come back unchanged."""
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        out.update(flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return out
