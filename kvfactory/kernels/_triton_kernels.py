"""The Triton kernels of :mod:`kvfactory.kernels.triton_decode` (imported only by it, on first use: this module
imports ``triton``, an optional dependency, and ``TRITON_INTERPRET`` is read when the kernels are decorated)."""
# ruff: noqa: N803 - Triton's constexpr parameters are upper case
import triton
import triton.language as tl


@triton.jit
def _unpack(ptr, rows, inside, byte_of, shift, WIDTH: tl.constexpr, NBITS: tl.constexpr):
    """The ``NBITS``-bit codes of ``rows`` (packed ``8 // NBITS`` per byte, ``WIDTH`` bytes a row) as floats."""
    codes = tl.load(ptr + rows[:, None] * WIDTH + byte_of[None, :], mask=inside[:, None], other=0)
    return ((codes.to(tl.int32) >> shift[None, :]) & ((1 << NBITS) - 1)).to(tl.float32)


@triton.jit
def _online_softmax(best, logits):
    """One block of flash-decoding's running softmax: the new running max, the factor that rescales what was summed
    so far, and the block's unnormalised weights (an all-masked block gets zero weight)."""
    new_best = tl.maximum(best, tl.max(logits, axis=0))
    safe = tl.where(new_best == -float("inf"), 0.0, new_best)
    return new_best, tl.exp(best - safe), tl.exp(logits - safe)


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, pid, channels, best, total, acc, D: tl.constexpr):
    """A program's partial result: running max, running sum and the unnormalised output row."""
    tl.store(m_ptr + pid, best)
    tl.store(l_ptr + pid, total)
    tl.store(acc_ptr + pid * D + channels, acc)


@triton.jit
def quantized_partial(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr,
                      n, num_kv_heads, groups, nq, HAS_VALID: tl.constexpr, D: tl.constexpr,
                      NBITS: tl.constexpr, KEY_GROUP: tl.constexpr, VALUE_GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)  # (b, query head, token), row-major over (B, Hq, nq)
    head = (pid // nq) % (num_kv_heads * groups)
    b = pid // (nq * num_kv_heads * groups)
    problem = b * num_kv_heads + head // groups
    PER_BYTE: tl.constexpr = 8 // NBITS
    WIDTH: tl.constexpr = D // PER_BYTE
    channels = tl.arange(0, D)
    byte_of = channels // PER_BYTE
    shift = (channels % PER_BYTE) * NBITS
    q = tl.load(q_ptr + pid * D + channels)
    best = -float("inf")
    total = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        inside = tokens < n
        rows = problem * n + tokens
        codes = _unpack(kc_ptr, rows, inside, byte_of, shift, WIDTH, NBITS)
        group = rows // KEY_GROUP
        scale = tl.load(ks_ptr + group[:, None] * D + channels[None, :], mask=inside[:, None], other=0.0)
        zero = tl.load(kz_ptr + group[:, None] * D + channels[None, :], mask=inside[:, None], other=0.0)
        logits = tl.sum((zero.to(tl.float32) + scale.to(tl.float32) * codes) * q[None, :], axis=1)
        visible = inside
        if HAS_VALID:
            visible = visible & (tl.load(valid_ptr + b * n + tokens, mask=inside, other=0) != 0)
        logits = tl.where(visible, logits, -float("inf"))
        new_best, alpha, p = _online_softmax(best, logits)
        codes = _unpack(vc_ptr, rows, inside, byte_of, shift, WIDTH, NBITS)
        side = rows[:, None] * (D // VALUE_GROUP) + (channels // VALUE_GROUP)[None, :]
        scale = tl.load(vs_ptr + side, mask=inside[:, None], other=0.0).to(tl.float32)
        zero = tl.load(vz_ptr + side, mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * (zero + scale * codes), axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        best = new_best
    _store_partial(m_ptr, l_ptr, acc_ptr, pid, channels, best, total, acc, D)


@triton.jit
def dense_partial(q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, num_kv_heads,
                  groups, nq, row_stride, valid_stride, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
                  D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    token = pid % nq
    head = (pid // nq) % (num_kv_heads * groups)
    b = pid // (nq * num_kv_heads * groups)
    problem = b * num_kv_heads + head // groups
    first = tl.load(start_ptr + problem)  # element offset of the problem's first row
    n = tl.load(length_ptr + problem)
    channels = tl.arange(0, D)
    q = tl.load(q_ptr + pid * D + channels)
    best = -float("inf")
    total = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        inside = tokens < n
        offsets = first + tokens[:, None] * row_stride + channels[None, :]
        keys = tl.load(k_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        logits = tl.sum(keys * q[None, :], axis=1)
        visible = inside
        if CAUSAL:
            visible = visible & (tokens <= n - nq + token)
        if HAS_VALID:
            visible = visible & (tl.load(valid_ptr + b * valid_stride + tokens, mask=inside, other=0) != 0)
        logits = tl.where(visible, logits, -float("inf"))
        new_best, alpha, p = _online_softmax(best, logits)
        values = tl.load(v_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        best = new_best
    _store_partial(m_ptr, l_ptr, acc_ptr, pid, channels, best, total, acc, D)

