"""Optional C++ CPU kernels, compiled on first use with ``torch.utils.cpp_extension`` (cached in torch's extensions
directory) and skipped, with one warning, when compiling or loading fails. ``KVFACTORY_NO_CPP_KERNELS=1`` disables
them.

- :func:`causal_attention_column_sums`: causal prefill attention and the column sums of its weights in one pass,
  so exact H2O scoring costs no second attention-sized pass on sdpa.
- :func:`quantized_decode_attention` (``decode_attention.cpp``): decode attention of a few new tokens over KIVI's
  packed 2/4/8-bit keys and values plus the full-precision residual, reading the codes directly (nothing
  dequantized is materialised). :mod:`kvfactory.storage.fused_decode` is the Python side (when it applies, fallbacks).
- :func:`ragged_decode_attention`: decode attention over a ragged (head-wise) store where each (sample, KV head)
  reads only its own slots.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DISABLE_VARIABLE = "KVFACTORY_NO_CPP_KERNELS"
_SOURCES = [Path(__file__).resolve().parent / name
            for name in ("causal_attention_column_sums.cpp", "decode_attention.cpp")]
# Query rows per block: as many as keep the block's fp32 logits within 1 MB (L2-sized), 16 to 64 rows (64 at 4k
# tokens measured 7% faster than sdpa's output alone, 16 rows 7% slower).
_LOGITS_BLOCK_BYTES = 1 << 20
_MIN_QUERY_BLOCK, _MAX_QUERY_BLOCK = 16, 64
# Flags per CPU capability, as PyTorch builds its own vectorized kernels (the name carries the capability, so one
# extensions directory shared by different machines never loads instructions a CPU lacks).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


# "every token valid" for the decode kernels (an empty bool tensor; read only, shared by every call)
_NO_VALIDITY = torch.empty(0, dtype=torch.bool)


def cpp_kernels_enabled() -> bool:
    """Whether the optional C++ kernels may be used (``KVFACTORY_NO_CPP_KERNELS`` unset or ``0``)."""
    return os.environ.get(DISABLE_VARIABLE, "0") in ("", "0")


def _sources_digest() -> str:
    """A short hash of the sources: checkouts with different kernels (worktrees, versions) sharing torch's
    extensions directory build and load their own library instead of rebuilding, or loading, each other's."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    """Compile (first time only) and load the kernels; False, after one warning, when that fails."""
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is a header template, parallel only when this file is compiled with OpenMP
    flags = ["-O3", "-fno-math-errno", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]
    logger.info("kvfactory: loading the C++ kernels (compiled on first use, then cached by torch)")
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=f"kvfactory_kernels_{capability.lower()}_{_sources_digest()}", sources=[str(source) for source in _SOURCES],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any compiler, linker or loader failure means "use the fallback"
        logger.warning("kvfactory: C++ kernels unavailable (%s: %s); using the slower pure-PyTorch path",
                       type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "")
        return False
    return True


def fused_column_sums_available() -> bool:
    """Whether :func:`causal_attention_column_sums` can run (enabled, and compiled and loaded on first call)."""
    return cpp_kernels_enabled() and _load()


def decode_kernels_available() -> bool:
    """Whether :func:`quantized_decode_attention` and :func:`ragged_decode_attention` can run (the same build)."""
    return cpp_kernels_enabled() and _load()


def supports_fused_column_sums(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the fused kernel handles this case: CPU, a plain causal prefill (as many keys as queries), floats."""
    return (queries.device.type == "cpu" and keys.device.type == "cpu" and queries.shape[-2] == keys.shape[-2]
            and queries.dtype in (torch.float32, torch.bfloat16, torch.float16))


def causal_attention_column_sums(queries: torch.Tensor, keys: torch.Tensor,
                                 values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a prompt over itself and the column sums of its weights, in one pass (fp32 inside).

    ``queries (B, Hq, n, d)``, ``keys/values (B, Hkv, n, d)`` (GQA native). Returns the output ``(B, Hq, n, d)``
    in the queries' dtype and ``column_sums (B, Hq, n)`` fp32: the softmax weight every key received, summed over
    all queries. Call only when :func:`fused_column_sums_available` and :func:`supports_fused_column_sums`.
    """
    return torch.ops.kvfactory.causal_attention_column_sums(queries, keys, values, _query_block(keys.shape[-2]))


def _query_block(num_keys: int) -> int:
    """Query rows per block for ``num_keys`` keys (see ``_LOGITS_BLOCK_BYTES``)."""
    rows = _LOGITS_BLOCK_BYTES // (4 * max(1, num_keys))
    return max(_MIN_QUERY_BLOCK, min(_MAX_QUERY_BLOCK, rows))


def quantized_decode_attention(query: torch.Tensor, blocks: list[tuple[torch.Tensor, ...]],
                               residual_keys: torch.Tensor, residual_values: torch.Tensor,
                               residual_valid: torch.Tensor | None, nbits: int, key_group: int,
                               value_group: int) -> torch.Tensor:
    """``softmax(q·kᵀ/√d)·v`` of ``query (B, Hq, nq, d)`` fp32 over packed blocks and a residual (GQA native).

    Each block is ``(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, valid)``, as
    :class:`~kvfactory.quant.groups.GroupQuantized` holds them (keys per channel in groups of ``key_group``
    tokens, values per token in groups of ``value_group`` channels; ``valid (B, n)`` bool or None); the residual
    ``(B, Hkv, R, d)`` fp32 (rows contiguous; a view of a buffer with headroom is read in place) holds the ``nq`` new tokens last (causal among them). Returns ``(B, Hq, nq, d)`` fp32.
    Call only when :func:`decode_kernels_available`.
    """
    parts = list(zip(*blocks)) if blocks else [()] * 7
    valid = [_NO_VALIDITY if v is None else v.contiguous() for v in parts[6]]
    return torch.ops.kvfactory.quantized_decode_attention(
        query.contiguous(), *(list(part) for part in parts[:6]), valid, residual_keys, residual_values,
        _NO_VALIDITY if residual_valid is None else residual_valid.contiguous(), nbits, key_group, value_group)


def ragged_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            prefix_rows: int, tail_capacity: int, tail_length: int,
                            tail_valid: torch.Tensor | None) -> torch.Tensor:
    """Decode attention of ``query (B, Hq, nq, d)`` fp32 over a ragged store's flat ``keys/values`` fp32: each
    (sample, KV head) sees its prefix segment (``lengths (B, Hkv)`` int64, segments one after the other) and its
    tail tokens (token-major after ``prefix_rows`` rows, ``tail_capacity`` per sample, the last ``nq`` being the
    new ones, causal among them; ``tail_valid (B, capacity)`` or None). Returns ``(B, Hq, nq, d)`` fp32."""
    return torch.ops.kvfactory.ragged_decode_attention(
        query.contiguous(), keys, values, lengths.contiguous(), prefix_rows, tail_capacity, tail_length,
        _NO_VALIDITY if tail_valid is None else tail_valid.contiguous())
