"""LongBench metrics and scoring on hand-made cases, including the official quirks (benchmarks.md §1.5, §1.6, §5)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from kvfactory.metrics.longbench import (
    DATASET2METRIC, classification_score, code_sim_score, count_score, normalize_answer, normalize_zh_answer,
    qa_f1_score, qa_f1_zh_score, retrieval_score, retrieval_zh_score, rouge_score, rouge_zh_score, score_results,
    scorer, scorer_e,
)


def test_qa_f1() -> None:
    assert qa_f1_score("", "x") == 0 and isinstance(qa_f1_score("", "x"), int)
    assert qa_f1_score("a an the", "the") == 0
    assert qa_f1_score("The Eiffel Tower, in Paris.", "Eiffel Tower") == pytest.approx(2 / 3)
    assert qa_f1_score("Paris paris", "paris") == pytest.approx(2 / 3)  # multiset overlap
    assert normalize_answer("The quick-brown fox, an ANIMAL.") == "quickbrown fox animal"


def test_zh_segmentation_and_normalization() -> None:
    assert normalize_zh_answer("厦门 大学。ABC") == "厦门大学abc"
    assert qa_f1_zh_score("厦门大学", "厦门大学。") == 1.0  # the full stop is its own jieba token, then dropped
    assert 0 < qa_f1_zh_score("厦门大学举办", "厦门大学") < 1
    assert qa_f1_zh_score("。", "厦门大学") == 0
    assert rouge_zh_score("今天天气很好", "今天天气很好") == 0.999999995


def test_rouge_quirks() -> None:
    assert rouge_score("The cat sat", "The cat sat") == 0.999999995
    for empty in ("", "...", " "):
        assert rouge_score(empty, "a b") == 0.0
    assert rouge_score("a b", "") == 0.0
    assert rouge_score("A B", "a b") == 0.0  # case-sensitive
    assert rouge_score("the the the cat", "the cat") == 0.999999995  # set semantics
    assert rouge_score("The cat sat on the mat.", "The cat is on the mat.") == 0.8333333283333335
    assert rouge_score("a b c. d e", "a b c d e f") == 0.9090909041322315
    long_text, short_text = " ".join(["w"] * 1500), " ".join(["w"] * 500)
    assert rouge_score(long_text, long_text) == 0.0  # RecursionError in rouge's LCS back-trace
    assert rouge_score(short_text, short_text) == 0.999999995


def test_classification_duplicates_and_skip_bug() -> None:
    assert classification_score("LOC or HUM", "LOC", all_classes=["LOC", "HUM", "NUM"]) == 0.5
    assert classification_score("ABC", "ABC", all_classes=["A", "B", "ABC"]) == 0.5  # upstream removal-skip bug
    assert classification_score("NUM", "LOC", all_classes=["LOC", "HUM", "NUM"]) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("LOC", "LOC", all_classes=None)


def test_retrieval_and_count_numbers() -> None:
    assert retrieval_score("Paragraph 1, Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_score("no number", "Paragraph 3") == 0.0
    with pytest.raises(IndexError):
        retrieval_score("Paragraph 1", "the first one")
    assert retrieval_zh_score("段落3", "段落3") == 1.0
    assert count_score("There are 12 unique paragraphs, not 13.", "12") == 0.5
    assert count_score("none", "3") == 0.0


def test_code_similarity_on_the_difflib_path() -> None:
    assert code_sim_score("", "") == 1.0  # equivalence is checked before emptiness
    assert code_sim_score("```python\n", "x") == 0.0
    assert code_sim_score("# c\nx = 1", "x = 1") == 1.0
    assert code_sim_score("\n    return x + 1\n", "    return x+1") == 0.93
    assert code_sim_score("babcabcc", "aaacb") == 0.15  # 0.46 with python-Levenshtein: the backend is pinned


def test_scorer_first_line_max_over_answers_and_rounding() -> None:
    classes = ["LOC", "HUM", "NUM"]
    assert scorer("trec", ["\n\nLOC\nmore HUM"], [["LOC"]], classes) == 100.0  # first line after leading newlines
    assert scorer("qasper", ["LOC\nHUM"], [["HUM"]], None) == pytest.approx(66.67)  # no cut for other tasks
    assert scorer("triviaqa", ["Paris"], [["London", "Paris"]], None) == 100.0  # max over answers
    assert scorer("hotpotqa", ["x y z", "x"], [["x y"], ["y"]], None) == 40.0  # round(100 * mean, 2)
    assert scorer("hotpotqa", ["b c d e f g"], [["b"]], None) == 28.57
    assert set(DATASET2METRIC) >= {"lsht", "repobench-p", "passage_retrieval_zh"} and len(DATASET2METRIC) == 21
    with pytest.raises(ValueError, match="not a LongBench dataset"):
        scorer("squad", ["x"], [["x"]], None)


def test_scorer_e_buckets_by_length_field() -> None:
    scores = scorer_e("hotpotqa_e", ["x", "y", "y", "x"], [["x"], ["x"], ["y"], ["x"]], [3999, 4000, 7999, 8000], None)
    assert scores["0-4k"] == 100.0 and scores["4-8k"] == 50.0 and scores["8k+"] == 100.0
    empty = scorer_e("hotpotqa_e", ["x"], [["x"]], [100], None)
    assert empty["0-4k"] == 100.0 and math.isnan(empty["4-8k"]) and math.isnan(empty["8k+"])


def _write(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            handle.write("\n")


def _record(i: int, pred: str, answer: str, length: int = 100) -> dict:
    return {"_id": f"id{i}", "pred": pred, "answers": [answer], "all_classes": None, "length": length}


def test_score_results_table_has_no_row_or_column_mixups(tmp_path, caplog) -> None:
    root = tmp_path / "smollm2-135m_128"
    # fullkv: hotpotqa 100, qasper 0; snapkv: hotpotqa 0, qasper 100; l2norm and cam only differ in qasper
    _write(root / "hotpotqa" / "fullkv.jsonl", [_record(0, "x", "x"), _record(1, "y", "y")])
    _write(root / "hotpotqa" / "snapkv.jsonl", [_record(0, "q", "x"), _record(1, "q", "y")])
    _write(root / "qasper" / "fullkv.jsonl", [_record(0, "q", "x")])
    _write(root / "qasper" / "snapkv.jsonl", [_record(0, "x", "x"), _record(0, "q", "x"), "{broken"])
    _write(root / "qasper" / "l2norm.jsonl", [_record(0, "x", "x")])
    _write(root / "qasper" / "cam.jsonl", [_record(0, "q", "x")])
    _write(root / "hotpotqa_e" / "fullkv.jsonl", [_record(0, "x", "x", 100), _record(1, "x", "y", 9000)])
    (root / "run_meta_fullkv.json").write_text("{}")
    columns, rows = score_results(root)
    assert columns == ["qasper", "hotpotqa", "hotpotqa_e/0-4k", "hotpotqa_e/4-8k", "hotpotqa_e/8k+", "average",
                       "average_e/0-4k", "average_e/4-8k", "average_e/8k+", "datasets"]
    assert list(rows) == ["fullkv", "cam", "l2norm", "snapkv"]
    assert rows["fullkv"]["hotpotqa"] == 100.0 and rows["fullkv"]["qasper"] == 0.0 and rows["fullkv"]["average"] == 50
    assert rows["snapkv"]["qasper"] == 100.0  # the repeated _id and the broken line are skipped
    assert rows["l2norm"]["qasper"] == 100.0 and rows["cam"]["qasper"] == 0.0
    assert rows["l2norm"]["datasets"] == 1 and rows["fullkv"]["datasets"] == 3
    assert "repeated" in caplog.text and "not valid JSON" in caplog.text
    with open(root / "results.csv", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["method", *columns]
    by_method = {row[0]: dict(zip(table[0], row)) for row in table[1:]}
    assert by_method["cam"]["qasper"] == "0.0" and by_method["l2norm"]["qasper"] == "100.0"
    assert by_method["fullkv"]["hotpotqa_e/4-8k"] == "" and by_method["fullkv"]["hotpotqa_e/8k+"] == "0.0"
    assert by_method["snapkv"]["hotpotqa_e/0-4k"] == ""
    metrics = json.loads((root / "hotpotqa_e" / "metrics.json").read_text())
    assert metrics == {"fullkv": {"0-4k": 100.0, "4-8k": None, "8k+": 0.0}}
    assert json.loads((root / "qasper" / "metrics.json").read_text()) == {
        "cam": 0.0, "fullkv": 0.0, "l2norm": 100.0, "snapkv": 100.0}


def test_score_results_rejects_unknown_dataset_folders(tmp_path) -> None:
    _write(tmp_path / "squad" / "fullkv.jsonl", [_record(0, "x", "x")])
    with pytest.raises(ValueError, match="not a LongBench dataset"):
        score_results(tmp_path)
    with pytest.raises(FileNotFoundError):
        score_results(tmp_path / "missing")
