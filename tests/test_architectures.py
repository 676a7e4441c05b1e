"""The architecture registry and the features only some architectures have: Phi-3's and Mixtral's sliding window
(applied by stock 4.44.2 only under flash-attn, checked here against stock eager given the window as a 4-D mask),
Phi-3's LongRoPE across ``original_max_position_embeddings``, Qwen2's per-layer window setting."""
from __future__ import annotations

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import kvfactory
from kvfactory import models
from kvfactory.architectures import ADAPTERS, adapter_for, supported_architectures
from tests.conftest import ARCHITECTURES, decode_loop, random_prompt


def test_every_adapter_has_a_tiny_test_config_and_the_tests_run_it() -> None:
    classes = [model_class for adapter in ADAPTERS for model_class in adapter.model_classes]
    assert supported_architectures() == classes
    tiny_classes = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[type(models.model_config(f"tiny-{arch}")).model_type]
                    for arch in ARCHITECTURES]
    assert tiny_classes == classes
    for arch in ARCHITECTURES:
        assert type(adapter_for(models.random_model(f"tiny-{arch}"))).__name__ != "LlamaAdapter" or arch == "llama"


def _window_mask(query_positions: torch.Tensor, key_length: int, window: int) -> torch.Tensor:
    """Stock 4.44.2 flash-attn's window as an additive 4-D mask: query ``i`` sees keys ``j`` with ``0 <= i - j <= w``."""
    distance = query_positions[:, None] - torch.arange(key_length)[None, :]
    allowed = (distance >= 0) & (distance <= window)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def _stock_windowed_run(model: torch.nn.Module, ids: torch.Tensor, window: int, steps: int) -> list[torch.Tensor]:
    """Prefill and greedy decode on the unpatched model, the window given as a 4-D mask at every call."""
    with torch.no_grad():
        length = ids.shape[1]
        output = model(ids, attention_mask=_window_mask(torch.arange(length), length, window), use_cache=True)
        logits = [output.logits[:, -1]]
        for step in range(steps):
            position = length + step
            token = logits[-1].argmax(-1, keepdim=True)
            output = model(token, attention_mask=_window_mask(torch.tensor([position]), position + 1, window),
                           past_key_values=output.past_key_values, position_ids=torch.tensor([[position]]),
                           use_cache=True)
            logits.append(output.logits[:, -1])
    return logits


@pytest.mark.parametrize("arch", ["phi3", "mixtral"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_sliding_window_matches_stock_flash_semantics(arch: str, implementation: str) -> None:
    """Window 8 over a 30-token prompt and 6 decoded tokens: patched fullkv (no mask given) equals stock eager given
    the flash window as a mask; the window really changes the logits."""
    window = 8
    model = models.random_model(f"tiny-{arch}", attn_implementation=implementation, sliding_window=window)
    stock = models.random_model(f"tiny-{arch}", attn_implementation="eager", sliding_window=window)
    ids = random_prompt(30)
    expected = _stock_windowed_run(stock, ids, window, 6)
    with kvfactory.patch(model, "fullkv"):
        actual = decode_loop(model, ids, 6)[0]
    for step, (reference, patched) in enumerate(zip(expected, actual)):
        assert (reference - patched).abs().max().item() <= 1e-5, f"step {step}"
    unwindowed, _ = decode_loop(models.random_model(f"tiny-{arch}", attn_implementation="eager"), ids, 0)
    assert (unwindowed[0] - expected[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_phi3_longrope_parity_across_the_original_context(implementation: str) -> None:
    """LongRoPE switches from the short to the long factors past 32 positions (the tiny config's original context):
    a 24-token prompt decoded across the boundary, and a 48-token prompt, give stock's logits."""
    model = models.random_model("tiny-phi3-longrope", attn_implementation=implementation)
    stock = models.random_model("tiny-phi3-longrope", attn_implementation="eager")
    for length, steps in ((24, 14), (48, 3)):
        ids = random_prompt(length)
        expected = decode_loop(stock, ids, steps)[0]
        with kvfactory.patch(model, "fullkv"):
            actual = decode_loop(model, ids, steps)[0]
        for step, (reference, patched) in enumerate(zip(expected, actual)):
            assert (reference - patched).abs().max().item() <= 1e-5, f"length {length}, step {step}"


def test_phi3_longrope_keeps_positions_after_eviction() -> None:
    """StreamingLLM keeps 4 sink + 12 recent tokens of a 48-token prompt (long factors); the next token's logits equal
    stock eager's when that token attends only the kept positions (a 4-D mask): kept keys kept their positions."""
    model = models.random_model("tiny-phi3-longrope", attn_implementation="eager")
    ids, next_token = random_prompt(48, seed=5), torch.tensor([[7]])
    kept = list(range(4)) + list(range(36, 48))
    with kvfactory.patch(model, "streamingllm", max_capacity_prompt=16, sink_size=4), torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        patched = model(next_token, past_key_values=cache, use_cache=True).logits[0, -1]
    allowed = torch.ones(49, 49).tril().bool()
    allowed[48] = False
    allowed[48, kept + [48]] = True
    mask = torch.zeros(1, 1, 49, 49).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        reference = model(torch.cat([ids, next_token], dim=1), attention_mask=mask).logits[0, -1]
        unmasked = model(torch.cat([ids, next_token], dim=1)).logits[0, -1]
    assert (patched - reference).abs().max().item() <= 1e-4
    assert (unmasked - reference).abs().max().item() > 1e-3


def test_qwen2_window_settings() -> None:
    """Qwen2.5 (use_sliding_window False) has no window; a window on every layer is applied; a window on some layers
    is refused with the accepted settings."""
    assert adapter_for(models.random_model("tiny-qwen2")).sliding_window(models.model_config("tiny-qwen2")) is None
    everywhere = models.model_config("tiny-qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    model = models.random_model(everywhere)
    assert adapter_for(model).sliding_window(everywhere) == 9
    some = models.model_config("tiny-qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="max_window_layers=1.*max_window_layers=0.*use_sliding_window=False"):
        kvfactory.patch(models.random_model(some), "fullkv")
