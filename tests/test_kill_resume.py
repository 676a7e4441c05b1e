"""Kill -9 at random points, then resume; and two runs into one folder (issue 19), through benchmarks/kill_resume.py.

The script forks each run from a fresh interpreter (one import for all), on a tiny random Llama with a character
tokenizer. Here one kill per runner keeps CI short; ``python -m benchmarks.kill_resume`` does the issue's 20.
"""
from __future__ import annotations

from pathlib import Path

from tests.conftest import benchmark_reports


def test_kill_9_then_resume_and_two_concurrent_runs_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    reports = benchmark_reports("kill_resume", "--kills", "1", "--seed", "3", "--workdir", str(tmp_path), timeout=600)
    for report in reports:
        assert report["kills"] == 1 and report["records"] >= 6
        assert (report["lost"], report["duplicated"], report["changed"]) == (0, 0, 0), report
        assert (report["concurrent_lost"], report["concurrent_duplicated"], report["concurrent_changed"]) == (0, 0, 0)
