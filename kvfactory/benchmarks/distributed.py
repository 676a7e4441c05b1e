"""Data parallel runs under ``torchrun`` / ``accelerate launch`` (issue 18): one worker per process, a strided shard
of the pending jobs each, rank 0 alone for what is written once (run metadata, scores, plots).

The launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``;
:func:`setup` reads them, joins the process group (gloo on CPU, nccl on CUDA) and sets this process's threads. Without
them (a plain ``python run_*.py``) everything here is a no-op: rank 0 of 1.

How the work is split (:func:`shard_keys`): rank 0 reads which jobs of a results file are still pending (after resume
filtering) and broadcasts their keys; rank ``r`` takes keys ``r, r + N, r + 2N, ...``. All ranks agree on the list, so
the shards are disjoint and cover it, whatever each rank had seen of the file; a resume (with any number of
processes) recomputes the pending list, so the jobs of a killed rank are picked up then. The results files already
take concurrent writers (one locked append per record, :class:`~kvfactory.benchmarks.common.ResultsFile`), so the folder
is the one a single process would write: the same records, each once.

``accelerate launch --num_processes N`` starts N workers only when it uses its multi-GPU launcher: on a machine without
GPUs give it ``--multi_gpu`` (its workers then join a gloo group on CPU, like ``torchrun``'s); without that flag it
starts one process, which :func:`setup` reports with a warning (the run is correct, only not split).

Threads: ``OMP_NUM_THREADS`` when set (``torchrun`` sets 1 for several processes per node), otherwise the CPU count
divided by the processes on this node, at least 1.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["Rank", "context", "setup", "barrier", "shard_keys", "is_main", "worker_device"]


@dataclass(frozen=True)
class Rank:
    """Where this process stands in a data parallel run.

    Attributes
    ----------
    rank, world_size
        This worker's index and the number of workers (``RANK``, ``WORLD_SIZE``; 0 and 1 without a launcher).
    local_rank, local_world_size
        The same on this node (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); ``local_rank`` picks the GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun / accelerate "
                         "launch)") from error


def context() -> Rank:
    """This process's :class:`Rank`, from the launcher's environment variables."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent: need 0 <= RANK < WORLD_SIZE")
    return Rank(rank, world_size, local_rank, local_world_size)


def is_main() -> bool:
    """Whether this process is rank 0 (always, without a launcher)."""
    return context().is_main


def threads_per_process(rank: Rank) -> int:
    """``OMP_NUM_THREADS`` when set, else CPU count ÷ processes on this node (at least 1)."""
    configured = _env_int("OMP_NUM_THREADS", 0)
    if configured > 0:
        return configured
    return max(1, (os.cpu_count() or 1) // max(1, rank.local_world_size))


def setup() -> Rank:
    """Join the launcher's process group (once) and set this process's torch threads; returns its :class:`Rank`.

    Raises
    ------
    ValueError
        When ``WORLD_SIZE`` > 1 but ``MASTER_ADDR`` / ``MASTER_PORT`` are missing (start the runner with ``torchrun``
        or ``accelerate launch``, which set them).
    """
    rank = context()
    if not rank.parallel:
        if single_process_accelerate_launch():
            logger.warning("accelerate launch started this run as one process (its simple launcher: no GPUs and no "
                           "--multi_gpu). For N processes on CPU use `accelerate launch --multi_gpu --num_processes N` "
                           "or `torchrun --nproc_per_node N`; this run does all the work alone")
        return rank
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"WORLD_SIZE={rank.world_size} but {', '.join(missing)} not set: start data parallel runs "
                             "with torchrun --nproc_per_node N or accelerate launch --num_processes N")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(rank.local_rank)
        dist.init_process_group(backend=backend)
        threads = threads_per_process(rank)
        torch.set_num_threads(threads)
        logger.info("rank %d of %d (local %d of %d): %s backend, %d torch threads", rank.rank, rank.world_size,
                    rank.local_rank, rank.local_world_size, backend, threads)
    return rank


def single_process_accelerate_launch() -> bool:
    """Whether ``accelerate launch --num_processes N`` (N > 1) fell back to one process: its simple launcher sets
    ``ACCELERATE_MIXED_PRECISION`` and, for N > 1, ``MASTER_ADDR``, but no ``WORLD_SIZE``."""
    return ("ACCELERATE_MIXED_PRECISION" in os.environ and bool(os.environ.get("MASTER_ADDR"))
            and not os.environ.get("WORLD_SIZE"))


def worker_device() -> str | None:
    """``cuda:LOCAL_RANK`` for a data parallel worker on a GPU machine, None otherwise (the model stays where the
    loader puts it)."""
    rank = context()
    if rank.parallel and torch.cuda.is_available():
        return f"cuda:{rank.local_rank}"
    return None


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if setup().parallel:
        import torch.distributed as dist

        dist.barrier()


def shard_keys(pending: Sequence[Any]) -> list[Any]:
    """This rank's share of ``pending``: rank 0's list, broadcast, then every ``world_size``-th key from ``rank``.

    Every rank must call it for the same results file in the same order (the runners do: they walk the same tasks).
    Single process: ``pending`` unchanged.
    """
    rank = setup()
    if not rank.parallel:
        return list(pending)
    import torch.distributed as dist

    dist.barrier()  # every rank is done with earlier files before rank 0 reads this one
    payload = [list(pending) if rank.is_main else None]
    dist.broadcast_object_list(payload, src=0)
    keys = payload[0]
    return keys[rank.rank :: rank.world_size]
