"""Models spread by accelerate (device_map, hooks) run patched; the patch's tensors follow the layer's dtype."""
from __future__ import annotations

import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from transformers import AutoModelForCausalLM

import kvfactory
from tests.conftest import greedy, random_prompt, tiny_model


def test_device_map_loaded_model_runs_patched(tmp_path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    mapped = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sdpa", device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                          "model.layers.1": "cpu", "model.norm": "cpu",
                                                          "lm_head": "cpu"}
    ).eval()
    ids = random_prompt(50)
    with kvfactory.patch(reference, "snapkv", max_capacity_prompt=16):
        expected = greedy(reference, ids, 6)
    with kvfactory.patch(mapped, "snapkv", max_capacity_prompt=16) as handle:
        assert torch.equal(greedy(mapped, ids, 6), expected)
    assert handle.last_cache.kept_tokens() == [21, 21]


def test_accelerate_hooks_are_kept_and_restored() -> None:
    """With accelerate hooks on every module (as device_map="auto" installs on GPUs), the patch goes under the hook
    (``_old_forward``) so inputs still move to each layer's device, and removal restores the hook's forward."""
    model = tiny_model("llama")
    ids = random_prompt(40)
    expected = greedy(model, ids, 5)
    cpu_offload(model, execution_device=torch.device("cpu"))  # hooks on every module holding weights
    attention = model.model.layers[0].self_attn
    for module in (attention, model.model):
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    hooked_forward, original = attention.forward, attention._old_forward
    with kvfactory.patch(model, "fullkv"):
        assert attention.forward is hooked_forward and attention._old_forward is not original
        assert torch.equal(greedy(model, ids, 5), expected)
    assert attention._old_forward is original


def test_half_precision_cache_keeps_the_model_dtype() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    ids = random_prompt(40)
    with kvfactory.patch(model, "h2o", max_capacity_prompt=16, decode_budget=18) as handle:
        greedy(model, ids, 6)
    store = handle.last_cache.stores[0]
    assert store.keys.dtype == store.values.dtype == torch.bfloat16
    assert store.positions.dtype == torch.int32 and store.extra("scores").dtype == torch.float32
    with kvfactory.patch(model, "adakv", max_capacity_prompt=16) as handle:
        greedy(model, ids, 3)
    assert handle.last_cache.stores[1].flat_keys.dtype == torch.bfloat16
