"""``benchmarks/gpu_check.sh --tiny``: the GPU check's every code path on CPU, so it cannot rot before a GPU runs it."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPOSITORY


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KVFACTORY_NO_CPP_KERNELS", "1")  # the kernels' first compile would dominate the test
    from benchmarks import gpu_check

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only spin, and slow everything when the machine is shared
    yield gpu_check
    torch.set_num_threads(threads)


def test_tiny_gpu_check_passes_without_touching_cuda(gpu_check, tmp_path: Path, cuda_forbidden: list[str],
                                                     capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--tiny", "--output_dir", str(tmp_path)]) == 0
    assert cuda_forbidden == []
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv", encoding="utf-8")))
    checks = {(row["check"], row["model"]) for row in rows}
    for model in gpu_check.TINY_MODELS:
        for check in ("parity", "prefill/fullkv", "tpot/fullkv", "peak saved/kv saved", "batch8/batch1 throughput",
                      "split device map", "fused decode"):
            assert (check, model) in checks, (check, model)
    parity = [row for row in rows if row["check"] == "parity"]
    assert {row["config"] for row in parity} == {"eager", "sdpa"}  # no flash-attn, no CUDA here
    assert all(row["passed"] == "True" and float(row["value"]) <= 1e-5 for row in parity)
    split = [row for row in rows if row["check"] == "split device map"]
    assert len(split) == 3 * len(gpu_check.TINY_MODELS)
    assert all(row["passed"] == "True" and float(row["value"]) == 1.0 for row in split)
    speed_rows = [row for row in rows if row["check"] in ("prefill/fullkv", "tpot/fullkv")]
    assert {row["config"].split()[0] for row in speed_rows} == set(gpu_check.METHODS)
    assert all(float(row["value"]) > 0 for row in speed_rows)
    assert {int(row["context"]) for row in speed_rows} == {48, 96}
    fused = {(row["model"], row["config"].split()[0]): row for row in rows if row["check"] == "fused decode"}
    assert set(fused) == {(model, family) for model in gpu_check.TINY_MODELS for family in ("ragged", "quantized")}
    compiled = gpu_check.fused_switch(torch.device("cpu"))[3]  # False only without a working C++ compiler
    for (model, _), row in fused.items():  # the C++ decode kernels against the fallback, from the same prefill
        if not compiled:
            assert row["passed"] == "" and "cannot run here" in row["detail"]
        elif model == "tiny-mistral":  # a sliding window: the kernels do not cover it, and the row says so
            assert row["passed"] == "" and "not covered" in row["detail"]
        else:
            assert row["passed"] == "True" and float(row["value"]) > 0 and " 0 kernel calls" not in row["detail"]
            assert float(row["detail"].split("difference ")[1].split()[0]) <= 1e-5
    table = capsys.readouterr().out
    assert "split device map" in table and "peak saved/kv saved" in table and "FAILED" not in table


def test_gpu_defaults_and_argument_errors(gpu_check) -> None:
    args = gpu_check.parse_args(["--device", "cuda"])
    assert args.models == ["llama-3-8b", "qwen2-7b"] and args.context_lengths == [8192, 16384, 32768]
    assert args.dtype == "bfloat16" and args.budget == 2048 and args.batch == 8
    assert gpu_check._split_map(4, args.device)["model.layers.1"] == 0
    assert gpu_check._split_map(4, args.device)["model.layers.2"] == "cpu"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--tiny", "--budget", "64"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "everything"])


def test_shell_entry_point() -> None:
    result = subprocess.run(["bash", str(REPOSITORY / "benchmarks" / "gpu_check.sh"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd="/")
    assert result.returncode == 0 and "--tiny" in result.stdout
    assert sys.executable  # the script runs `python` from PATH, as CI does
