"""Peak memory of a block of code, counted the same way on CUDA and on CPU: bytes of tensors, not of the process.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching allocator's count of
  live tensor bytes), minus what was allocated when the block started.
- CPU: :class:`TensorMemoryTracker`, a ``TorchDispatchMode`` that sees every tensor an operator returns and counts
  each new storage's bytes until the last tensor using it dies (views and in-place results share their input's
  storage and add nothing; storages that existed before the block are not counted). Buffers an operator allocates
  and frees inside its own kernel are invisible to it, as are non-tensor allocations, so it is a lower bound of
  CUDA's count for the same work. It costs Python time on every operator: never time code while it runs.

``with peak_memory(device) as peak: ...`` then ``peak.bytes`` (peak over the start) and ``peak.how``.
Every CUDA call sits behind a check of the device type, so CPU-only machines never touch ``torch.cuda``.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_COUNT = "cuda max_memory_allocated"
CPU_COUNT = "cpu tensor storages"


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the CPU tensor storages created while it is active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive using it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._track(tensor, inputs)
        return output

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address == 0:
            return
        entry = self._live.get(address)
        if entry is None:
            if address in inputs:  # a view of, or an in-place write into, a storage from before the block
                return
            entry = self._live[address] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        entry = self._live.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[address]


@dataclass
class PeakMemory:
    """What :func:`peak_memory` measured: ``bytes`` above the start, and ``how`` it was counted."""

    device: torch.device
    how: str
    bytes: int = 0


@contextmanager
def peak_memory(device: str | torch.device) -> Iterator[PeakMemory]:
    """Measure the peak tensor memory of the block on ``device`` (CUDA counter or CPU tensor tracking)."""
    device = torch.device(device)
    if device.type == "cuda":
        result = PeakMemory(device, CUDA_COUNT)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    if device.type != "cpu":
        raise ValueError(f"peak_memory counts cuda or cpu tensors, not {device.type}")
    result = PeakMemory(device, CPU_COUNT)
    tracker = TensorMemoryTracker()
    with tracker:
        yield result
    result.bytes = tracker.peak
