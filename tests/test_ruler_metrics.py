"""RULER scoring: the official metrics (§5 cases) and the results-folder scorer."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from kvfactory.metrics import ruler as metrics


def test_official_cases() -> None:
    assert metrics.string_match_all(["The numbers are 123 and 456"], [["123", "456", "789"]]) == 66.67
    assert metrics.string_match_part(["Paris"], [["paris", "London"]]) == 100.0
    assert metrics.string_match_all(["PARIS"], [["paris"]]) == 100.0  # case-insensitive both ways
    assert metrics.postprocess_pred(" a\x00b \n") == "a\nb"
    assert metrics.postprocess_pred("\tx\x1fy\x7f ") == "x\ny\x7f"  # only \x00-\x1f are control characters here


def test_substring_side_effects_and_rounding() -> None:
    assert metrics.string_match_all(["91234567"], [["1234567"]]) == 100.0  # a digit run contains the needle
    assert metrics.string_match_all(["a", "b", "c"], [["a"], ["a"], ["a"]]) == 33.33
    assert metrics.string_match_part(["x", "y"], [["x", "q"], ["q"]]) == 50.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.string_match_all(["a", "b"], [["a"]])


def test_task_metric_map_and_score_task() -> None:
    assert set(metrics.TASK_METRICS) >= {"niah_single_1", "vt", "cwe", "fwe", "qa_1", "qa_2"}
    assert metrics.metric_for("qa_1") is metrics.string_match_part
    assert metrics.metric_for("niah_multiquery") is metrics.string_match_all
    assert metrics.metric_for("qa_custom") is metrics.string_match_part
    preds, refs = [" Paris is the answer\x00"], [["paris", "london"]]
    assert metrics.score_task(preds, refs, "qa_2") == 100.0
    assert metrics.score_task(preds, refs, "vt") == 50.0
    assert metrics.score_task(["x"], [[None]], "vt") == 0.0  # RULER's guard for unlabelled sets


def write_lines(path: Path, rows: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def test_score_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [{"index": 0, "pred": "1234567 and 7654321", "outputs": ["1234567", "7654321"]},
            {"index": 1, "pred": "nothing", "outputs": ["1111111"]}]
    write_lines(tmp_path / "4096" / "niah_single_1" / "fullkv.jsonl", good)
    write_lines(tmp_path / "4096" / "niah_single_1" / "snapkv.jsonl", [
        {"index": 0, "pred": "1234567", "outputs": ["1234567", "7654321"], "length": 4000},
        "{not json", {"index": 1, "outputs": ["x"]}, {"index": 0, "pred": "dup", "outputs": ["1"]}, [1, 2]])
    write_lines(tmp_path / "4096" / "qa_1" / "fullkv.jsonl",
                [{"index": 0, "pred": "It is Paris.", "outputs": ["paris", "rome"]}])
    write_lines(tmp_path / "8192" / "vt" / "fullkv.jsonl",
                [{"index": 0, "pred": "A B", "outputs": ["A", "B", "C", "D"]}])
    write_lines(tmp_path / "8192" / "vt" / "snapkv.jsonl", [{"index": 0, "pred": "A", "outputs": ["A", "B", "C", "D"]}])
    write_lines(tmp_path / "8192" / "vt" / "h2o.jsonl", [{"index": 0, "pred": "", "outputs": ["A"]}])
    (tmp_path / "8192" / "vt" / "metrics.json").write_text(json.dumps({"streamingllm": 12.5, "h2o": 99.0}))
    write_lines(tmp_path / "8192" / "cwe" / "fullkv.jsonl", ["garbage"])  # nothing usable: no column
    (tmp_path / "notes").mkdir()

    with caplog.at_level(logging.WARNING, logger="kvfactory.metrics.ruler"):
        table = metrics.score_results(tmp_path)
    assert sum("skipped" in r.message for r in caplog.records) == 5
    assert list(table) == ["fullkv", "h2o", "snapkv"]
    assert table["fullkv"] == {"4096/niah_single_1": 50.0, "4096/qa_1": 100.0, "8192/vt": 50.0,
                               "4096/average": 75.0, "8192/average": 50.0, "average": 66.67}
    assert table["snapkv"] == {"4096/niah_single_1": 50.0, "8192/vt": 25.0, "4096/average": 50.0,
                               "8192/average": 25.0, "average": 37.5}
    merged = json.loads((tmp_path / "8192" / "vt" / "metrics.json").read_text())
    assert merged == {"streamingllm": 12.5, "h2o": 0.0, "fullkv": 50.0, "snapkv": 25.0}
    assert not (tmp_path / "8192" / "cwe" / "metrics.json").exists()

    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["method", "4096/niah_single_1", "4096/qa_1", "4096/average", "8192/vt", "8192/average",
                       "average"]
    assert [r[0] for r in rows[1:]] == ["fullkv", "h2o", "snapkv"]
    assert rows[2] == ["h2o", "", "", "", "0.0", "0.0", "0.0"]
    assert rows[3][3] == "50.0" and rows[3][4] == "25.0"

    write_lines(tmp_path / "8192" / "vt" / "pyramidkv.jsonl",
                [{"index": 0, "pred": "a b c d", "outputs": ["A", "B"]}])
    metrics.score_results(tmp_path)  # a later run adds its method and keeps the others
    merged = json.loads((tmp_path / "8192" / "vt" / "metrics.json").read_text())
    assert merged["pyramidkv"] == 100.0 and merged["streamingllm"] == 12.5 and merged["fullkv"] == 50.0


def test_score_results_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        metrics.score_results(tmp_path / "absent")
