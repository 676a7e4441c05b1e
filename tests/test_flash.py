"""The flash_attention_2 path, run on CPU through the test-only flash_attn stand-in (tests/stand_ins/flash_attn).

The stand-in first proves itself against sdpa (causal bottom-right, GQA, window, varlen); then kvfactory's flash path
is compared with sdpa: fullkv logits against the unpatched models (transformers' own flash path included), compressed
methods' kept tokens and greedy tokens, left-padded batches (varlen) and sliding windows. Spies on the stand-in check
that the flash kernels really ran instead of the sdpa fallback.
"""
from __future__ import annotations

from collections import Counter
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kvfactory
from tests.conftest import ARCHITECTURES, greedy, method_params, random_prompt, tiny_model

TOLERANCE = 1e-5  # fp32: flash and sdpa differ by summation order only


@pytest.fixture
def flash_calls(flash_stand_in: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the stand-in's calls by function and window (kvfactory imports them at call time)."""
    calls: Counter = Counter()
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        original = getattr(flash_stand_in, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            calls[(_name, tuple(kwargs.get("window_size", (-1, -1))))] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(flash_stand_in, name, spy)
    return calls


def _pair(arch: str, **overrides: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same seeded weights under sdpa and under flash_attention_2."""
    from kvfactory import models

    return (models.random_model(f"tiny-{arch}", attn_implementation="sdpa", **overrides),
            models.random_model(f"tiny-{arch}", attn_implementation="flash_attention_2", **overrides))


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_prompt(40, batch=3, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    mask[2, :23] = 0
    return ids, mask


# -- the stand-in itself ------------------------------------------------------------------------------------------
def _reference(q, k, v, mask=None, causal=False):
    """sdpa on (B, S, H, d) tensors with GQA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def test_stand_in_matches_sdpa(flash_stand_in: ModuleType) -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, h, 16, generator=generator) for s, h in ((7, 4), (11, 2), (11, 2)))
    # causal is bottom-right aligned: query i sees keys j <= i + 11 - 7
    bottom_right = torch.ones(7, 11, dtype=torch.bool).tril(4)
    assert torch.allclose(flash_stand_in.flash_attn_func(q, k, v, causal=True), _reference(q, k, v, bottom_right),
                          atol=TOLERANCE)
    assert torch.allclose(flash_stand_in.flash_attn_func(q, k, v), _reference(q, k, v), atol=TOLERANCE)
    # window (left 3, causal): query i sees keys i + 4 - 3 .. i + 4
    slots, diagonal = torch.arange(11)[None], torch.arange(7)[:, None] + 4
    windowed = (slots <= diagonal) & (slots >= diagonal - 3)
    output, lse, _ = flash_stand_in.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), return_attn_probs=True)
    assert torch.allclose(output, _reference(q, k, v, windowed), atol=TOLERANCE)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / 4
    expected_lse = logits.masked_fill(~windowed, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and torch.allclose(lse, expected_lse, atol=TOLERANCE)
    # varlen: packed sequences of lengths 5 and 3 equal two separate calls
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    packed = [torch.randn(8, h, 16, generator=generator) for h in (4, 2, 2)]
    varlen = flash_stand_in.flash_attn_varlen_func(*packed, cu, cu, 5, 5, causal=True)
    for start, stop in ((0, 5), (5, 8)):
        alone = flash_stand_in.flash_attn_func(*(t[None, start:stop] for t in packed), causal=True)[0]
        assert torch.allclose(varlen[start:stop], alone, atol=TOLERANCE)
    with pytest.raises(RuntimeError, match="int32"):
        flash_stand_in.flash_attn_varlen_func(*packed, cu.long(), cu.long(), 5, 5)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_stand_in.flash_attn_func(q, k, v, dropout_p=0.1)


def test_transformers_sees_the_stand_in(flash_stand_in: ModuleType) -> None:
    from transformers.utils import import_utils
    from transformers.utils import is_flash_attn_2_available

    assert is_flash_attn_2_available() and import_utils.is_flash_attn_greater_or_equal("2.4.1")
    model = tiny_model("llama", "flash_attention_2")
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaFlashAttention2"


# -- kvfactory's flash path against sdpa --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fullkv_flash_logits_equal_unpatched(arch: str, flash_calls: Counter) -> None:
    """Patched fullkv under flash == stock sdpa, prefill and a decode loop, for every architecture; == the stock
    flash model (transformers + stand-in) too, except Mistral past its window (kvfactory applies sdpa's window on
    every implementation, see :mod:`kvfactory.architectures.mistral`); the flash kernels ran for every layer."""
    sdpa, flash = _pair(arch)
    ids = random_prompt(30)
    with torch.no_grad():
        reference = sdpa(ids).logits
        stock_flash = flash(ids).logits
        stock_calls = flash_calls["flash_attn_func"]
        with kvfactory.patch(flash, "fullkv"):
            output = flash(ids, use_cache=True)
            prefill_calls = flash_calls["flash_attn_func"] - stock_calls
            logits = [output.logits[:, -1]]
            token = output.logits[:, -1:].argmax(-1)
            for _ in range(3):
                output = flash(token, past_key_values=output.past_key_values, use_cache=True)
                logits.append(output.logits[:, -1])
                token = output.logits[:, -1:].argmax(-1)
        sequence = torch.cat([ids, torch.stack([l.argmax(-1) for l in logits[:-1]], dim=1)], dim=1)
        expected = sdpa(sequence).logits[:, ids.shape[1] - 1:]
    if arch == "mistral":  # stock 4.44.2 disagrees with itself past the window: flash sees distance 16, sdpa not
        assert (stock_flash - reference).abs().max().item() > 0.01
    else:
        assert (stock_flash - reference).abs().max().item() <= TOLERANCE
    assert (logits[0][:, None] - reference[:, -1:]).abs().max().item() <= TOLERANCE
    assert (torch.stack(logits, 1) - expected).abs().max().item() <= TOLERANCE
    assert prefill_calls == flash.config.num_hidden_layers


def test_fullkv_flash_padded_batch_is_varlen(flash_calls: Counter) -> None:
    """A left-padded batch: the prompt runs flash_attn_varlen_func over the real tokens (cu_seqlens), and logits at
    real positions and greedy tokens equal sdpa's."""
    sdpa, flash = _pair("llama")
    ids, mask = _padded_batch()
    with torch.no_grad(), kvfactory.patch(sdpa, "fullkv"), kvfactory.patch(flash, "fullkv"):
        expected, actual = sdpa(ids, attention_mask=mask).logits, flash(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (expected[real] - actual[real]).abs().max().item() <= TOLERANCE
        assert flash_calls["flash_attn_varlen_func"] == flash.config.num_hidden_layers
        assert torch.equal(greedy(flash, ids, 6, attention_mask=mask), greedy(sdpa, ids, 6, attention_mask=mask))


@pytest.mark.parametrize("method,params", [
    ("snapkv", {"max_capacity_prompt": 16, "window_size": 4}),
    ("pyramidkv", {"max_capacity_prompt": 16, "window_size": 4}),
    ("h2o", {"max_capacity_prompt": 16, "window_size": 4, "decode_budget": 18}),
    ("streamingllm", {"max_capacity_prompt": 16, "sink_size": 4, "decode_budget": 18}),
    ("adakv", {"max_capacity_prompt": 16, "window_size": 4}),  # ragged storage
    ("headkv", {"max_capacity_prompt": 16, "window_size": 4}),
    ("snapkv", {"max_capacity_prompt": 16, "window_size": 4, "quant_method": "kivi", "nbits": 4}),  # quantized
])
def test_compressed_methods_keep_the_same_tokens_under_flash(method: str, params: dict, flash_calls: Counter) -> None:
    """Same kept positions in every layer and head, same greedy tokens, on one prompt and on a padded batch."""
    sdpa, flash = _pair("llama")
    params = method_params(method, **params)
    prompts = [(random_prompt(48, seed=1), None), _padded_batch()]
    for ids, mask in prompts:
        with kvfactory.patch(sdpa, method, **params) as reference, kvfactory.patch(flash, method, **params) as handle:
            expected = greedy(sdpa, ids, 5, attention_mask=mask)
            actual = greedy(flash, ids, 5, attention_mask=mask)
            assert torch.equal(actual, expected), (method, mask is not None)
            for layer in range(flash.config.num_hidden_layers):
                assert torch.equal(handle.last_cache.kept_positions(layer),
                                   reference.last_cache.kept_positions(layer)), (method, layer)
    assert flash_calls["flash_attn_func"] > 0 and flash_calls["flash_attn_varlen_func"] > 0


def test_h2o_reuses_the_flash_lse(flash_stand_in: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """H2O's prefill scores take the log-sum-exp from the flash kernel (return_attn_probs) instead of recomputing."""
    from kvfactory.methods import scoring

    recomputed = []
    original = scoring.causal_logsumexp
    monkeypatch.setattr(scoring, "causal_logsumexp", lambda *a: recomputed.append(1) or original(*a))
    sdpa, flash = _pair("llama")
    ids = random_prompt(48, seed=2)
    with kvfactory.patch(flash, "h2o", max_capacity_prompt=16) as handle, \
            kvfactory.patch(sdpa, "h2o", max_capacity_prompt=16) as reference:
        greedy(flash, ids, 2)
        assert not recomputed
        greedy(sdpa, ids, 2)
        for layer in range(2):
            assert torch.equal(handle.last_cache.kept_positions(layer), reference.last_cache.kept_positions(layer))


def test_sliding_window_runs_in_the_kernel(flash_calls: Counter) -> None:
    """Mistral (window 16, a query sees distances < 16): the prompt runs flash with window_size=(15, 0), equal to
    sdpa; decoding past the window over a compressed cache falls back to sdpa's positional mask, still equal."""
    sdpa, flash = _pair("mistral")
    ids = random_prompt(40, seed=4)
    with torch.no_grad():
        reference = sdpa(ids).logits
        with kvfactory.patch(flash, "fullkv"):
            patched = flash(ids).logits
    assert (patched - reference).abs().max().item() <= TOLERANCE
    assert flash_calls[("flash_attn_func", (15, 0))] == flash.config.num_hidden_layers
    ids, mask = _padded_batch()
    for method, params in (("fullkv", {}), ("snapkv", {"max_capacity_prompt": 12, "window_size": 4})):
        with kvfactory.patch(sdpa, method, **params), kvfactory.patch(flash, method, **params):
            assert torch.equal(greedy(flash, ids, 20, attention_mask=mask), greedy(sdpa, ids, 20, attention_mask=mask))
    assert flash_calls[("flash_attn_varlen_func", (15, 0))] > 0


def test_flash_only_window_models_match_stock_flash(flash_calls: Counter) -> None:
    """Mixtral's window exists only on the stock flash path, where ``window_size=(w, w)`` sees distances <= w:
    kvfactory's patched flash gives the stock flash logits."""
    _, flash = _pair("mixtral", sliding_window=12)
    ids = random_prompt(36, seed=5)
    with torch.no_grad():
        stock = flash(ids).logits
        with kvfactory.patch(flash, "fullkv"):
            patched = flash(ids).logits
    assert (patched - stock).abs().max().item() <= TOLERANCE
    assert flash_calls[("flash_attn_func", (12, 0))] == flash.config.num_hidden_layers


def test_flash_on_cuda_needs_half_precision(flash_stand_in: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA kernels take fp16/bf16 only: a float32 model on CUDA is refused at patch time, saying what to do."""
    model = tiny_model("llama", "flash_attention_2")
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    monkeypatch.setattr(model, "parameters", lambda *args, **kwargs: iter([on_cuda]))
    with pytest.raises(ValueError, match="float16 or bfloat16 on CUDA"):
        kvfactory.patch(model, "fullkv")
