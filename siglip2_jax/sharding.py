"""From the logical axes every parameter carries to `NamedSharding`s on a device mesh.

A mesh has a "data" axis (the batch is split over it; what `pmap` used to do) and optionally a "model"
axis over which the big weight dimensions are split (FSDP/tensor parallel for models too large for one
device). Logical axis names map to mesh axes through `rules`; an axis whose size the mesh axis does not
divide stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import Siglip2Config
from .model.build import flat_param_specs

DEFAULT_RULES = {"layers": None, "embed": None, "proj": None, "mlp": "model", "heads": "model", "vocab": "model"}


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """All devices as a (data, model) mesh; `model_parallel` devices share each model replica."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(-1, model_parallel), ("data", "model"))


def partition_spec(axes: tuple, shape: tuple, mesh: Mesh, rules=None) -> PartitionSpec:
    rules = DEFAULT_RULES if rules is None else rules
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name)
        if mesh_axis is not None and (mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(config: Siglip2Config, mesh: Mesh, rules=None) -> dict[str, NamedSharding]:
    """{parameter path: NamedSharding}, flat and in the stacked layout (`siglip2_jax.params`); per-layer
    params made by `to_layout` are placed like their stacked array minus its leading axis."""
    return {path: NamedSharding(mesh, partition_spec(axes, shape, mesh, rules))
            for path, (shape, axes) in flat_param_specs(config).items()}


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over "data", everything else replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))
