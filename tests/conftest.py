"""Shared fixtures: tiny random-weight models built from in-code configs (no download, about a second each)."""
from __future__ import annotations

import logging

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
    return params
