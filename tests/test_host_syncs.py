"""Issue 19 case 10: no host synchronization on the decode path.

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``), an operation whose output size depends on values (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``repeat_interleave`` with tensor repeats) or ``torch.equal`` waits for the device to
finish every queued kernel: once per layer, such a call serializes a decode step. CUDA's
``torch.cuda.set_sync_debug_mode`` reports them on a GPU; on CPU (CI) :func:`count_host_syncs` emulates it by
wrapping those entry points and recording each call made from kvfactory's own code (the first frame outside torch),
so a test can assert that a decode step makes none.

Indexing is watched through a ``TorchFunctionMode``, not by assigning ``torch.Tensor.__getitem__``: assigning it on
the class gives ``torch.Tensor`` CPython's sequence slot, which deleting the attribute does not take back, and from
then on ``torch.tensor([t0, t1])`` of 0-d tensors fails with "len() of a 0-d tensor" (it broke transformers' beam
search in the same process; ``test_counting_leaves_torch_as_it_was`` pins it).
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import kvfactory
from kvfactory import models
from tests.conftest import method_params, random_prompt

KVFACTORY = str(Path(kvfactory.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
_HERE = str(Path(__file__).resolve())

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
          "masked_select", "unique")


def _caller() -> str | None:
    """``file:line`` of the innermost frame outside torch and this module, or None."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TORCH) and name != _HERE and not name.startswith("<"):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _is_value_dependent_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


class _ValueDependentIndexing(torch.overrides.TorchFunctionMode):
    """Records indexing with a boolean tensor (``t[mask]``, ``t[mask] = v``): its output size depends on values."""

    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _is_value_dependent_index(args[1]):
            self.record(func.__name__)
        # a wrapped read dispatches here with its wrapper as func: call what it wraps (it has already been counted)
        return getattr(func, "__wrapped__", func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Count the calls that synchronize with the device, by caller ``file:line``, while the block runs."""
    calls: Counter = Counter()
    originals: dict[tuple[object, str], object] = {}

    def record(what: str) -> None:
        where = _caller()
        if where is not None:
            calls[f"{where} {what}"] += 1

    def wrap(owner: object, name: str, condition=None) -> None:
        original = getattr(owner, name)
        originals[(owner, name)] = original if name in vars(owner) else None  # None: inherited, delete to restore

        def wrapper(*args, **kwargs):
            if condition is None or condition(*args, **kwargs):
                record(name)
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original
        setattr(owner, name, wrapper)

    for name in _READS:
        wrap(torch.Tensor, name)
    for name in ("nonzero", "masked_select", "unique", "equal"):
        wrap(torch, name)
    wrap(torch.Tensor, "repeat_interleave",
         lambda self, repeats=None, *a, **k: isinstance(repeats, torch.Tensor) and "output_size" not in k)
    wrap(torch, "repeat_interleave",
         lambda x, repeats=None, *a, **k: isinstance(repeats, torch.Tensor) and "output_size" not in k)
    try:
        with _ValueDependentIndexing(record):
            yield calls
    finally:
        for (owner, name), original in originals.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def kvfactory_syncs(calls: Counter) -> dict[str, int]:
    return {where: count for where, count in calls.items() if where.startswith(KVFACTORY)}


DECODE_CASES = [  # (architecture, method, parameters): every storage family, RoPE kind and the sliding window
    ("llama", "fullkv", {}),
    ("llama", "snapkv", {"max_capacity_prompt": 24}),
    ("llama", "h2o", {"max_capacity_prompt": 24, "decode_budget": 26}),  # evicts on every step
    ("llama", "streamingllm", {"max_capacity_prompt": 24, "decode_budget": 26}),
    ("llama", "adakv", {"max_capacity_prompt": 24}),  # ragged storage, its tail grows while decoding
    ("llama", "headkv", {"max_capacity_prompt": 24}),
    ("mistral", "fullkv", {}),  # sliding window 16: the step's positions pass it
    ("mistral", "adakv", {"max_capacity_prompt": 24}),
    ("qwen2", "pyramidkv", {"max_capacity_prompt": 24}),  # table-style RoPE (seq_len)
    ("mixtral", "cam", {"max_capacity_prompt": 24}),
    ("phi3", "snapkv", {"max_capacity_prompt": 24}),
    ("gpt-neox", "snapkv", {"max_capacity_prompt": 24}),  # its own RoPE call
]


def _decode_syncs(arch: str, implementation: str, method: str, params: dict, steps: int, with_mask: bool
                  ) -> list[dict[str, int]]:
    """kvfactory's host reads during each of ``steps`` decode steps after a 40-token prompt (the attention mask of
    ``generate`` passed on every step when ``with_mask``)."""
    model = models.random_model(f"tiny-{arch}", attn_implementation=implementation)
    ids = random_prompt(40)
    per_step = []
    with torch.no_grad(), kvfactory.patch(model, method, **method_params(method, **params)):
        output = model(ids, use_cache=True)
        token = output.logits[:, -1:].argmax(-1)
        for step in range(steps):
            mask = torch.ones(1, ids.shape[1] + step + 1, dtype=torch.long) if with_mask else None
            with count_host_syncs() as calls:
                output = model(token, attention_mask=mask, past_key_values=output.past_key_values, use_cache=True)
            per_step.append(kvfactory_syncs(calls))
            token = output.logits[:, -1:].argmax(-1)
    return per_step


@pytest.mark.parametrize("arch,method,params", DECODE_CASES, ids=[f"{a}-{m}" for a, m, _ in DECODE_CASES])
def test_a_decode_step_reads_nothing_back_per_layer(arch: str, method: str, params: dict) -> None:
    """Zero host reads on a decode step (RoPE tables sized by the host's logical length, the sliding window decided
    on the host, ragged lengths kept as host ints); with an attention mask, exactly one per forward, whatever the
    number of layers: whether the new token is padding (patching's ``_new_token_validity``)."""
    for implementation in ("eager", "sdpa"):
        for step, syncs in enumerate(_decode_syncs(arch, implementation, method, params, 10, with_mask=False)):
            assert syncs == {}, (implementation, step, syncs)
        for step, syncs in enumerate(_decode_syncs(arch, implementation, method, params, 4, with_mask=True)):
            assert len(syncs) == 1 and sum(syncs.values()) == 1, (implementation, step, syncs)
            assert "kvfactory/patching.py" in next(iter(syncs)), syncs


def test_quantized_storage_reads_back_only_when_it_quantizes_the_residual() -> None:
    """KIVI with an 8-token residual: the steps that quantize a full residual block read each tensor's range once
    (fp16 or fp32 side data, issue 19 case 9), per layer, keys and values; every other step reads nothing."""
    params = {"max_capacity_prompt": 24, "quant_method": "kivi", "nbits": 4, "q_group_size": 8,
              "quant_residual_length": 8}
    per_step = _decode_syncs("llama", "sdpa", "snapkv", params, 12, with_mask=False)
    flushes = [step for step, syncs in enumerate(per_step) if syncs]
    assert len(flushes) == 1, per_step
    (where, count), = per_step[flushes[0]].items()
    assert "kvfactory/quant/groups.py" in where and count == 2 * 2  # 2 layers, keys and values


def test_the_counter_sees_host_reads() -> None:
    """The emulation counts what it should: the fallback of ``rotary_at`` without a host bound reads the positions'
    maximum once; a ragged prompt compression copies the kept counts to the host once per layer (ragged buffers are
    sized by them) and gathers the kept rows with ``nonzero_static`` (no boolean-mask indexing, a read each)."""
    from kvfactory.architectures.base import rotary_at

    model = models.random_model("tiny-qwen2")
    rotary = model.model.layers[0].self_attn.rotary_emb
    positions = torch.arange(5)[None]
    with count_host_syncs() as calls:
        rotary_at(rotary, torch.ones(1, 1, 5, 8), positions)
    assert sum(kvfactory_syncs(calls).values()) == 1
    with count_host_syncs() as calls:
        cos, sin = rotary_at(rotary, torch.ones(1, 1, 5, 8), positions, limit=5)
    assert kvfactory_syncs(calls) == {} and cos.shape[-2] == 5
    model = models.random_model("tiny-llama")
    with torch.no_grad(), kvfactory.patch(model, "adakv", max_capacity_prompt=24):
        with count_host_syncs() as calls:
            model(random_prompt(40), use_cache=True)
    ragged = {where: count for where, count in kvfactory_syncs(calls).items() if "storage/ragged.py" in where}
    device_reads = {where: count for where, count in ragged.items() if where.endswith((" cpu", " __getitem__"))}
    assert sum(device_reads.values()) == model.config.num_hidden_layers, ragged  # one .cpu() per layer
    # the rest read that host copy (the counter cannot tell a CPU-resident tensor from a device one on CPU)
    assert all(where.endswith((" tolist", " __int__")) for where in set(ragged) - set(device_reads)), ragged


def test_counting_leaves_torch_as_it_was() -> None:
    """The counter sees boolean-mask indexing, and afterwards torch behaves as before: 0-d tensors are not sequences
    (``torch.tensor([t0, t1])`` works, as transformers' beam search needs) and no wrapper is left behind."""
    before = {name: vars(torch.Tensor).get(name) for name in (*_READS, "__getitem__", "__setitem__")}
    values = torch.arange(6.0)
    with count_host_syncs() as calls:
        values[values > 2] = 0.0
        picked = values[values < 1]
    assert picked.tolist() == [0.0, 0.0, 0.0, 0.0]
    read = {where.rsplit(" ", 1)[1] for where in calls}
    assert {"__getitem__", "__setitem__"} <= read, calls
    assert {name: vars(torch.Tensor).get(name) for name in before} == before
    assert torch.tensor([torch.tensor(1.0), torch.tensor(2.0)]).tolist() == [1.0, 2.0]
