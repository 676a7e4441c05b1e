"""No code path of kvfactory, its benchmarks or its CLIs calls CUDA unguarded on a CPU machine; memory accounting
counts tensors on CPU; ``device_map="auto"`` without a GPU runs on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvfactory
from kvfactory.benchmarks import speed
from kvfactory.benchmarks.memory import CPU_COUNT, CUDA_COUNT, TensorMemoryTracker, peak_memory
from tests.conftest import REPOSITORY, greedy, random_prompt, tiny_model


def test_the_guard_catches_an_unguarded_call(cuda_forbidden: list[str]) -> None:
    """Code compiled as if it were kvfactory's is stopped; the same call from outside the repository passes."""
    code = compile("import torch\ntorch.cuda.synchronize()\n", str(REPOSITORY / "kvfactory" / "x.py"), "exec")
    with pytest.raises(AssertionError, match="unguarded torch.cuda.synchronize"):
        exec(code, {})
    with pytest.raises(AssertionError, match="unguarded Tensor.cuda"):
        exec(compile("import torch\ntorch.ones(1).cuda()\n", str(REPOSITORY / "run_x.py"), "exec"), {})
    assert cuda_forbidden == ["torch.cuda.synchronize at kvfactory/x.py:2", "Tensor.cuda at run_x.py:2"]
    cuda_forbidden.clear()
    assert torch.cuda.is_available() is False


@pytest.mark.parametrize("method,params", [
    ("h2o", {"max_capacity_prompt": 16, "decode_budget": 18}),
    ("adakv", {"max_capacity_prompt": 16}),
    ("snapkv", {"max_capacity_prompt": 16, "quant_method": "kivi", "nbits": 2, "q_group_size": 8,
                "quant_residual_length": 8}),
])
def test_speed_measurement_and_generation_stay_off_cuda(method: str, params: dict,
                                                        cuda_forbidden: list[str]) -> None:
    model = tiny_model("llama")
    ids = random_prompt(40)
    with kvfactory.patch(model, method, **params):
        result = speed.measure(model, ids, method=method, new_tokens=3, repeats=1, warmup=1)
        greedy(model, ids, 3)
    with peak_memory(ids.device) as peak:
        speed.run_timed(model, ids, 2)
    assert result.peak_memory_bytes > 0 and peak.bytes > 0 and peak.how == CPU_COUNT
    assert cuda_forbidden == []


def test_speed_cli_stays_off_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda_forbidden: list[str]) -> None:
    monkeypatch.syspath_prepend(str(REPOSITORY))
    import run_speed

    assert run_speed.main(["--config", "tiny-qwen2", "--dtype", "auto", "--context_lengths", "24", "--new_tokens",
                           "2", "--repeats", "1", "--warmup", "0", "--output_dir", str(tmp_path),
                           "--methods", "snapkv:max_capacity_prompt=16"]) == 0
    meta = json.loads((tmp_path / "speed" / "run_meta.json").read_text())
    assert meta["device"].startswith("cpu") and meta["args"]["dtype"] == "auto"
    assert cuda_forbidden == []


def test_tensor_tracker_counts_storages_not_views() -> None:
    base = torch.ones(10)
    with TensorMemoryTracker() as tracker:
        first = torch.zeros(1000, 250)  # 1 MB
        view = first.t()[:10]  # a view: nothing new
        base.add_(1)  # in place into a storage from before: nothing new
        second = first + 1  # 1 MB
        del first, view
        third = torch.empty(500, 250)  # 0.5 MB, after the first was freed
        assert tracker.current == 1_500_000
    assert tracker.peak == 2_000_000
    del second, third


def test_peak_memory_sees_what_the_cache_saves() -> None:
    """Peak tensor memory on CPU drops by about the KV bytes a compressed cache does not hold."""
    model = tiny_model("llama")
    ids = random_prompt(400)
    peaks, caches = {}, {}
    for method, params in (("fullkv", {}), ("snapkv", {"max_capacity_prompt": 32})):
        with kvfactory.patch(model, method, **params), peak_memory("cpu") as peak:
            run = speed.run_timed(model, ids, 3)
        peaks[method], caches[method] = peak.bytes, run.final_bytes
    saved_peak, saved_cache = peaks["fullkv"] - peaks["snapkv"], caches["fullkv"] - caches["snapkv"]
    assert saved_cache > 0 and 0.5 * saved_cache <= saved_peak <= 1.5 * saved_cache
    assert CUDA_COUNT != CPU_COUNT
    with pytest.raises(ValueError, match="counts cuda or cpu"):
        with peak_memory("meta"):
            pass


def test_device_map_auto_without_a_gpu_runs_on_cpu(tmp_path: Path, cuda_forbidden: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa", device_map="auto").eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16) as handle:
        greedy(model, random_prompt(40), 3)
    assert handle.last_cache.kept_tokens() == [18, 18]
    assert cuda_forbidden == []


def test_accelerators_score_in_larger_chunks() -> None:
    """H2O's column sums run over query chunks: cache-sized on CPU, 16x larger elsewhere (fewer Python steps)."""
    from kvfactory.methods.scoring import score_chunk_elements

    assert score_chunk_elements(torch.device("cpu")) == 1 << 22
    assert score_chunk_elements(torch.device("cuda", 0)) == 1 << 26
