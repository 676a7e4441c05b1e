"""benchmarks/campaign_report.py over a synthetic campaign folder: tables per benchmark and paired ordering checks."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import campaign_report


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _campaign(root: Path) -> None:
    for method, found in (("fullkv", [1] * 5), ("snapkv", [1] * 5), ("h2o", [0] * 5)):
        _jsonl(root / "passkey" / "m_256" / f"{method}.jsonl",
               [{"_id": f"4096-{d}-0", "length": 4096, "depth": d, "seed": 0, "passkey": "12345",
                 "pred": " 12345." if hit else " 1."} for d, hit in zip((0, 25, 50, 75, 100), found)])
    for method, budget, recall in (("fullkv", None, lambda d: 1.0), ("streamingllm", 256, lambda d: float(d in (0, 100)))):
        folder = root / "needle" / f"m_{method}"
        folder.mkdir(parents=True)
        for length in (2048, 4096):
            for depth in (0, 25, 50, 75, 100):
                (folder / f"len_{length}_depth_{depth * 100}_results.json").write_text(json.dumps(
                    {"method": method, "budget": budget, "model": "m", "context_length": length,
                     "depth_percent": depth, "recall": recall(depth)}))
    for method, preds in (("pyramidkv", ["the cat sat"] * 6), ("snapkv", ["a dog ran"] * 6),
                          ("streamingllm", ["a dog ran"] * 6)):
        _jsonl(root / "longbench" / "m_128" / "multi_news" / f"{method}.jsonl",
               [{"_id": str(i), "length": 100, "pred": pred, "answers": ["the cat sat"], "all_classes": None}
                for i, pred in enumerate(preds)])


def test_report_tables_and_orderings(tmp_path: Path) -> None:
    _campaign(tmp_path)
    text = campaign_report.report(tmp_path, tmp_path / "figures")
    assert "| method | C | 4096 d0 | 4096 d25 | 4096 d50 | 4096 d75 | 4096 d100 | all | n |" in text
    assert "| fullkv | 256 | 1/1 | 1/1 | 1/1 | 1/1 | 1/1 | 5/5 | 5 |" in text
    assert "| h2o | 256 | 0/1 | 0/1 | 0/1 | 0/1 | 0/1 | 0/5 | 5 |" in text
    assert "passkey C=256: fullkv ≈ snapkv, difference ×100 +0.0 [+0.0, +0.0] (n=5)" in text
    assert "| streamingllm | 256 | 40.0 | 40.0 | 40.0 | 10 |" in text
    assert "streamingllm C=256: middle depths mean recall 0.0 (6 cells), depths 0/100 100.0 (4 cells)" in text
    assert "needle C=256: fullkv > streamingllm, difference ×100 +100.0 [+100.0, +100.0] (n=6) (middle depths" in text
    assert "longbench C=128: pyramidkv > snapkv, difference ×100 +100.0 [+100.0, +100.0] (n=6)" in text
    assert "ruler C=512: fullkv vs snapkv: not run yet" in text
    assert "longbench C=128: pyramidkv > streamingllm, difference ×100 +100.0 [+100.0, +100.0] (n=6)" in text
    assert "longbench C=128: snapkv ≈ streamingllm, difference ×100 +0.0 [+0.0, +0.0] (n=6)" in text
    assert "longbench C=1024: fullkv vs snapkv: not run yet" in text
    assert (tmp_path / "figures" / "needle_qwen_c256.png").stat().st_size > 10_000


def test_write_replaces_only_the_marked_part(tmp_path: Path) -> None:
    _campaign(tmp_path / "c")
    document = tmp_path / "results.md"
    document.write_text(f"# Results\nintro\n{campaign_report.BEGIN}\nstale table\n{campaign_report.END}\nanalysis\n")
    assert campaign_report.main(["--campaign_dir", str(tmp_path / "c"), "--write", str(document)]) == 0
    text = document.read_text()
    assert text.startswith("# Results\nintro\n") and text.endswith("analysis\n") and "stale table" not in text
    assert "**Passkey**" in text


def test_longbench_scores_stand_in_for_predictions_that_are_not_committed(tmp_path: Path) -> None:
    _campaign(tmp_path / "c")
    document = tmp_path / "results.md"
    document.write_text(f"{campaign_report.BEGIN}\n{campaign_report.END}\n")
    campaign_report.main(["--campaign_dir", str(tmp_path / "c"), "--write", str(document)])
    with_predictions = document.read_text()
    predictions = sorted((tmp_path / "c" / "longbench").glob("*/*/*.jsonl"))
    assert [p.name for p in predictions] == ["pyramidkv.jsonl", "snapkv.jsonl", "streamingllm.jsonl"]
    saved = json.loads(predictions[0].with_suffix(".scores.json").read_text())
    assert sorted(saved) == [str(i) for i in range(6)] and all(abs(v - 1.0) < 1e-6 for v in saved.values())
    for path in predictions:  # a clean clone: the gold answers are not there, the scores are
        path.unlink()
    campaign_report.main(["--campaign_dir", str(tmp_path / "c"), "--write", str(document)])
    assert document.read_text() == with_predictions
    assert "longbench C=128: pyramidkv > snapkv, difference ×100 +100.0 [+100.0, +100.0] (n=6)" in with_predictions
