"""Bad input fails loudly, saying what was wrong and what is accepted."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

import kvfactory
from kvfactory import methods
from tests.conftest import tiny_model


def test_unknown_method_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown method 'snapkvv'.*accepted methods: ada-pyramidkv, adakv, cam, .*fullkv"):
        methods.get("snapkvv")
    with pytest.raises(ValueError, match="unknown method"):
        kvfactory.patch(tiny_model("llama"), "nope")


def test_unknown_parameter_is_an_error() -> None:
    with pytest.raises(ValueError, match="'snapkv' does not accept window.*accepted parameters: max_capacity_prompt"):
        methods.get("snapkv", window=8)
    with pytest.raises(ValueError, match="'fullkv' does not accept max_capacity_prompt"):
        methods.get("fullkv", max_capacity_prompt=128)
    with pytest.raises(ValueError, match="'streamingllm' does not accept window_size"):
        methods.get("streamingllm", window_size=8)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "cam"])
def test_budget_not_larger_than_window(name: str) -> None:
    with pytest.raises(ValueError, match="max_capacity_prompt=8 must be an integer of at least 9 .larger than window_size=8"):
        methods.get(name, max_capacity_prompt=8, window_size=8)
    with pytest.raises(ValueError, match="decode_budget"):
        methods.get(name, max_capacity_prompt=64, decode_budget=4)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"gqa_score_agg": "median"}, "gqa_score_agg must be one of"),
        ({"pooling": "minpool"}, "pooling must be one of"),
        ({"merge": "average"}, "merge must be one of"),
        ({"max_capacity_prompt": 64, "max_capacity_prompt_ratio": 0.5}, "not both"),
        ({"max_capacity_prompt_ratio": 1.5}, r"must be in \(0, 1\]"),
        ({"compress_interval": 0}, "compress_interval must be a positive integer"),
    ],
)
def test_bad_parameter_values(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        methods.get("snapkv", **params)


def test_streamingllm_budget_must_exceed_sinks() -> None:
    with pytest.raises(ValueError, match="larger than sink_size=4"):
        methods.get("streamingllm", max_capacity_prompt=4)


def test_empty_prompt_is_an_error() -> None:
    model = tiny_model("llama")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16), pytest.raises(ValueError, match="prompt is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty sequence"):
        methods.get("snapkv").compress(torch.zeros(1, 4, 0, 16), torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))


def test_compress_rejects_bad_shapes() -> None:
    q, k = torch.zeros(1, 3, 10, 16), torch.zeros(1, 2, 10, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        methods.get("snapkv").compress(q, k, k)
    with pytest.raises(ValueError, match="4-D tensors"):
        methods.get("snapkv").compress(q[0], k[0], k[0])


def test_unsupported_model_names_the_supported_ones() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="unsupported model GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, GPTNeoXForCausalLM"):
        kvfactory.patch(model, "snapkv")


def test_flash_attention_without_the_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    monkeypatch.setattr("kvfactory.attention.flash_attn_available", lambda: False)
    with pytest.raises(ValueError, match="needs the flash-attn package") as error:
        kvfactory.patch(model, "snapkv")
    assert "Accepted implementations: eager, sdpa, flash_attention_2" in str(error.value)
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        kvfactory.models.random_model("tiny-llama", attn_implementation="flash_attention_2")


def test_foreign_cache_is_rejected() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        stock = model(torch.ones(1, 5, dtype=torch.long), use_cache=True).past_key_values  # a legacy tuple
    with kvfactory.patch(model, "fullkv"):
        with pytest.raises(ValueError, match="DynamicCache holding tokens"):
            model(torch.ones(1, 1, dtype=torch.long), past_key_values=DynamicCache.from_legacy_cache(stock))
        with pytest.raises(ValueError, match="got tuple"):
            model(torch.ones(1, 1, dtype=torch.long), past_key_values=stock)
