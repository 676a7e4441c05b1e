"""Models spread by accelerate (device_map, hooks) run patched; the patch's tensors follow the layer's dtype."""
from __future__ import annotations

import pytest
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


SPLIT_CASES = [("llama", "fullkv", {}), ("llama", "snapkv", {"max_capacity_prompt": 24}),
               ("llama", "h2o", {"max_capacity_prompt": 24, "decode_budget": 26}),
               ("qwen2", "pyramidkv", {"max_capacity_prompt": 24}), ("gpt-neox", "snapkv", {"max_capacity_prompt": 24})]


@pytest.mark.parametrize("arch,method,params", SPLIT_CASES, ids=[f"{a}-{m}" for a, m, _ in SPLIT_CASES])
def test_a_model_split_over_two_devices_keeps_each_layers_cache_on_its_device(arch: str, method: str,
                                                                              params: dict) -> None:
    """Two distinct devices without a GPU: layer 0 (and the embeddings) on ``cpu``, layer 1 and the head on
    ``meta``, joined by accelerate's ``AlignDevicesHook`` as ``device_map`` joins GPUs. Mixing devices in one
    operation is an error in torch, so any tensor kvfactory made on a default device instead of its layer's (a
    mask, positions, scores, an index) fails the run. Each layer's cache lives on its layer's device, and layer 0,
    whose inputs are real, keeps exactly what the same model on one device keeps, prompt and decoded tokens."""
    ids = random_prompt(40)
    reference = tiny_model(arch)
    with torch.no_grad(), kvfactory.patch(reference, method, **params):
        past = reference(ids, use_cache=True).past_key_values
        for _ in range(3):
            past = reference(torch.tensor([[5]]), past_key_values=past, use_cache=True).past_key_values
    expected = past.kept_positions(0)
    model = tiny_model(arch)
    base = model.gpt_neox if arch == "gpt-neox" else model.model
    head = model.embed_out if arch == "gpt-neox" else model.lm_head
    norm = base.final_layer_norm if arch == "gpt-neox" else base.norm
    meta = torch.device("meta")
    for module in (base.layers[1], norm, head):
        module.to(meta)
        add_hook_to_module(module, AlignDevicesHook(execution_device=meta))
    with torch.no_grad(), kvfactory.patch(model, method, **params):
        output = model(ids, use_cache=True)
        assert output.logits.device == meta and output.logits.shape == (1, 40, 128)
        for _ in range(3):
            output = model(torch.tensor([[5]]), past_key_values=output.past_key_values, use_cache=True)
    cache = output.past_key_values
    assert [store.keys.device for store in cache.stores] == [torch.device("cpu"), meta]
    assert cache.get_seq_length() == 43 and output.logits.device == meta
    assert torch.equal(cache.kept_positions(0), expected)
