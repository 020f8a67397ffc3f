"""Multi-process (multi-host) JAX jobs: joining one, and the few points where its processes meet.

Every host runs the same command with its own process id:

    siglip2-jax embed ... --coordinator-address 10.0.0.1:1234 --num-processes 4 --process-id 0   # host 0
    siglip2-jax embed ... --coordinator-address 10.0.0.1:1234 --num-processes 4 --process-id 1   # host 1 ...

or sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. On clusters JAX knows (Cloud TPU,
SLURM, Open MPI, Kubernetes...) the coordinator address alone is enough: JAX detects the rest.
"""

from __future__ import annotations

import os

import numpy as np

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the multi-process job described by the arguments or the environment; with neither, does
    nothing (one process). Must run before anything touches a JAX device. Returns whether it joined."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for name, env in ENV.items():
        if given[name] is None and os.environ.get(env):
            given[name] = os.environ[env] if name == "coordinator_address" else int(os.environ[env])
    if all(value is None for value in given.values()):
        return False
    import jax  # here, not at the top: the CLI's --help imports this module and must not wait for jax

    # CPU devices of different processes need a collectives library for the barriers below (GPU and TPU
    # bring their own); the setting must precede initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**given)
    return True


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier called `name`."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_process_0(flags: np.ndarray) -> np.ndarray:
    """Process 0's copy of a boolean array, on every process: one view of shared state for all of them
    (what each process sees of a file system may lag behind the others')."""
    import jax

    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32))).astype(bool)
