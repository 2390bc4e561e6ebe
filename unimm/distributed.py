"""Multi-process start-up: ``jax.distributed.initialize`` driven by the environment.

Three ways a run learns it is one of several processes:

* ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (what
  ``launch/local.sh`` and ``launch/gpu_multinode.sh`` export): explicit initialisation;
* a cluster JAX detects by itself (SLURM with several tasks, Open MPI, TPU pod slices with
  ``--multiprocess``): ``jax.distributed.initialize()`` with no arguments;
* neither: a single process, nothing to do.

On CPU, cross-process collectives need an implementation (gloo); it is selected here
before the backend starts.
"""
from __future__ import annotations

import os

import jax
from absl import logging

# Process-count variables set by multi-node launchers (TPU pods set none: pass --multiprocess).
WORLD_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
EXPLICIT_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def explicit_settings() -> dict | None:
    """``initialize`` keyword arguments from ``JAX_*`` variables, or None when unset."""
    present = [k for k in EXPLICIT_ENV if os.environ.get(k)]
    if not present:
        return None
    if len(present) != len(EXPLICIT_ENV):
        missing = sorted(set(EXPLICIT_ENV) - set(present))
        raise ValueError(f"multi-process start-up needs {', '.join(EXPLICIT_ENV)}; missing {', '.join(missing)}")
    n, pid = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={n})")
    return dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=pid)


def wanted(force: bool = False) -> bool:
    """Whether this run is one of several processes (``force``: the ``--multiprocess`` flag)."""
    return (force or explicit_settings() is not None
            or any(int(os.environ.get(k, "1") or 1) > 1 for k in WORLD_SIZE_ENV))


def _on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    return platforms.split(",")[0].strip() == "cpu"


def initialize(force: bool = False) -> bool:
    """Joins the process group when :func:`wanted`; returns whether it did."""
    if not wanted(force):
        return False
    if _on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    settings = explicit_settings()
    jax.distributed.initialize(**(settings or {}))
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
