"""Data parallel runs (issue 18): ``torchrun --nproc_per_node 2`` (gloo, CPU) of the LongBench, RULER and needle
runners give the folder a 1-process run gives; a rank killed mid-run, then a 1-process resume, loses and duplicates
nothing. Through ``benchmarks/data_parallel.py`` on a tiny random Llama with a character tokenizer (kill for LongBench
only here, to stay short; ``--kill longbench,ruler,needle`` covers all three)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvfactory.benchmarks import distributed
from tests.conftest import benchmark_reports


def test_two_processes_write_the_single_process_folder_and_a_killed_rank_resumes(tmp_path: Path) -> None:
    reports = benchmark_reports("data_parallel", "--samples", "6", "--kill", "longbench", "--workdir", str(tmp_path),
                                timeout=900)
    for report in reports:
        assert report["records"] >= 6
        assert (report["lost"], report["duplicated"], report["changed"]) == (0, 0, 0), report
    assert reports[0]["resumed"] == {"lost": 0, "duplicated": 0, "changed": 0}
    assert 0 < reports[0]["killed_with_records"] < reports[0]["records"]  # killed mid-run, not after


def test_accelerate_launch_multi_gpu_on_cpu_writes_the_single_process_folder(tmp_path: Path) -> None:
    [report] = benchmark_reports("data_parallel", "--samples", "4", "--runners", "needle", "--launcher", "accelerate",
                                 "--workdir", str(tmp_path), timeout=900, runners=("needle",))
    assert (report["launcher"], report["records"], report["lost"], report["duplicated"], report["changed"]) == (
        "accelerate", 4, 0, 0, 0)
    meta = json.loads(next((tmp_path / "runs" / "needle" / "two").glob("*/run_meta.json")).read_text())
    assert meta["world_size"] == 2  # two workers really ran, not accelerate's one-process fallback


def test_accelerate_single_process_fallback_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --num_processes 2` sets without GPUs
    with caplog.at_level("WARNING", logger="kvfactory.benchmarks.distributed"):
        assert distributed.setup().world_size == 1
    assert "accelerate launch --multi_gpu --num_processes N" in caplog.text
    monkeypatch.delenv("MASTER_ADDR")  # `accelerate launch` of one process: nothing to say
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvfactory.benchmarks.distributed"):
        distributed.setup()
    assert caplog.text == ""


def test_without_a_launcher_a_process_is_rank_0_of_1_and_keeps_every_job(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    rank = distributed.setup()
    assert (rank.rank, rank.world_size, rank.is_main, rank.parallel) == (0, 1, True, False)
    assert distributed.shard_keys(["a", "b", "c"]) == ["a", "b", "c"]
    assert distributed.worker_device() is None


def test_rank_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.context() == distributed.Rank(3, 4, 1, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.threads_per_process(distributed.context()) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert distributed.threads_per_process(distributed.context()) == 4  # 8 CPUs ÷ 2 processes on this node


def test_a_bad_rank_or_a_missing_rendezvous_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        distributed.context()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N or accelerate launch"):
        distributed.setup()
