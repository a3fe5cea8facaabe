"""Several hosts, one program: start-up, who writes shared files, and bringing sharded arrays home.

Every host runs the same `jlora train` command. Files outside the checkpoints (the default base, the
run config, the adapter, the plot) are written by process 0 alone while the others wait at a
barrier; orbax writes the checkpoints from all hosts.

`initialize()` starts jax.distributed when the environment describes several processes:
  - a Cloud TPU VM pod (TPU_WORKER_HOSTNAMES lists several workers) or JLORA_DISTRIBUTED=1:
    jax finds the rest from the platform;
  - JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID: explicit (GPU nodes
    without a scheduler; two CPU processes in the tests, which then use gloo collectives).
It must run before anything touches a JAX backend.
"""
from __future__ import annotations

import os

import jax


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def initialize() -> None:
    """jax.distributed.initialize() when the environment describes several processes (see module doc)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (coordinator or len(hosts) > 1 or os.environ.get("JLORA_DISTRIBUTED") == "1"):
        return
    if jax.distributed.is_initialized():
        return
    num_processes, process_id = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if (num_processes is None) != (process_id is None):
        raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (found "
                         f"JAX_NUM_PROCESSES={num_processes}, JAX_PROCESS_ID={process_id})")
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Every array of `tree` as a whole numpy array on this host (all processes must call it).

    jax.device_get needs every shard on this host; arrays sharded over several hosts are all-gathered.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
