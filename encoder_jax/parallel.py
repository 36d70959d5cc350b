"""Device mesh and shardings: batch over ('data', 'fsdp'); parameters optionally FSDP-sharded."""

from __future__ import annotations

import ctypes
import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from encoder_jax import errors

log = logging.getLogger("encoder_jax")

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when launched as one process of many.

    Cluster launchers (SLURM, Open MPI, TPU pods, Kubernetes JobSet) are detected
    by JAX itself; JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID set it up by hand (docs/scale.md).
    """
    import os

    markers = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    if not any(os.environ.get(m) for m in markers):
        return
    by_hand = {}
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(name):
            if not os.environ[name].isdigit():
                raise errors.ConfigError(f"{name}={os.environ[name]!r} must be a non-negative integer")
            by_hand[arg] = int(os.environ[name])
    try:
        jax.distributed.initialize(**by_hand)
    except RuntimeError as e:  # already initialised, e.g. in notebooks
        log.warning("jax.distributed.initialize skipped: %s", e)
        return
    if jax.process_count() > 1:
        # The first collective between processes sets up their communicators (on CPU, gloo
        # gives the others 30 s to join). Do it now, while every process has just connected,
        # rather than at whatever point a slow host reaches first later on.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("encoder_jax: every process started")


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A 2-D mesh ('data', 'fsdp'); fsdp=-1 puts every device on the fsdp axis."""
    devices = jax.devices() if devices is None else devices
    count = len(devices)
    fsdp = count if fsdp == -1 else fsdp
    if fsdp < 1 or count % fsdp:
        raise errors.ConfigError(f"mesh.fsdp={fsdp} must divide the device count {count} (or be -1)")
    grid = np.asarray(devices).reshape(count // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Shards the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2 ** 14) -> Any:
    """NamedShardings for every leaf of a state pytree (params and optimizer state alike)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size, min_size)),
        abstract_state)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global array sharded over the batch axes (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# XLA:CPU compile options per `train.cpu_scheduler`. "memory" orders the step's ops for
# least peak memory (XLA's default CPU scheduler runs independent ops side by side and
# keeps more buffers alive; it also moves recomputed (remat) activations back into the
# forward pass, where they save nothing), and lets copy insertion update parameters in
# place instead of copying them. Transformer-base translation step: XLA's temporary
# buffers 1,224 -> 982 MiB, the step time unchanged on 2 cores.
CPU_SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
               "xla_cpu_copy_insertion_use_region_analysis": True},
    "concurrency": {},
}


def compile_step(lowered: Any, cpu_scheduler: str = "memory") -> Any:
    """`lowered.compile()`, on CPU with the XLA options of `cpu_scheduler` (CPU_SCHEDULER_OPTIONS).

    A jaxlib that lacks an option compiles with its defaults (logged once per compile).
    """
    options = CPU_SCHEDULER_OPTIONS[cpu_scheduler] if jax.default_backend() == "cpu" else {}
    if options:
        try:
            return lowered.compile(options)
        except jax.errors.JaxRuntimeError as e:
            if "INVALID_ARGUMENT" not in str(e):
                raise
            log.warning("train.cpu_scheduler=%s: this jaxlib rejects its XLA options (%s); "
                        "compiling with XLA's defaults", cpu_scheduler, str(e).splitlines()[0])
    return lowered.compile()


def release_freed_host_memory() -> None:
    """Returns heap memory that was freed (the XLA compiler's scratch) to the OS.

    glibc keeps freed memory mapped: after compiling the Transformer-base translation
    step, ~300 MB of the compiler's scratch stay resident and the step's buffers stack
    on top of it (peak RSS). A no-op where the C library has no `malloc_trim`.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def keep_freed_host_memory() -> bool:
    """Makes glibc keep freed host memory mapped for reuse; call before JAX's first computation.

    By default glibc hands large freed blocks back to the OS (munmap, heap trims), so each
    train step maps its temporaries afresh: the Transformer-base translation step on 2 CPU
    cores takes ~190,000 page faults and ~0.5 s of system time per step. One malloc arena,
    no mmap'd blocks and no automatic trimming let every step reuse the same pages (usually
    a lower peak RSS; rarely one step's temporaries more, when a small allocation splits
    the hole they left: docs/scale.md). Must run before XLA's threads first allocate:
    each thread that allocates earlier gets an arena of its own. `launch.py` calls it;
    ENCODER_JAX_HOST_MALLOC=default keeps glibc's behaviour. Returns whether it was applied
    (False there, or where the C library has no `mallopt`).
    """
    import os

    policy = os.environ.get("ENCODER_JAX_HOST_MALLOC", "keep")
    if policy not in ("keep", "default"):
        raise errors.ConfigError(f"ENCODER_JAX_HOST_MALLOC={policy!r}; valid: keep, default")
    if policy == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))])
