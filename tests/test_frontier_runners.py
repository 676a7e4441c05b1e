"""The methods of issue 17 through the task runners end to end: run_longbench.py (a saved two-layer checkpoint with a
character tokenizer), run_ruler.py and run_passkey.py (two random layers over SmolLM2's tokenizer). One sample each,
a few new tokens; what is asserted is that each method is accepted by name with the usual budget flag, answers every
job, records its settings, and keeps what it should (everything for ``quest`` and ``think``, ``C`` per head for the
token-evicting scorers). ``tests/test_frontier_methods.py`` does the same for run_needle, run_ppl and run_speed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.kill_resume import tiny_checkpoint
from tests.test_frontier_methods import NEW

C = 16
KEEP_ALL = {"quest", "think"}  # quest reads pages but holds everything; think at its default prunes channels only
KEEP_C = {"tova", "expected_attention", "keydiff", "criticalkv", "kvzip"}  # kvzip: C per head on average (model-wide)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_kept(name: str, records: list[dict]) -> None:
    assert records and all(isinstance(r["pred"], str) and r["input_tokens"] > C for r in records), name
    for record in records:
        if name in KEEP_ALL:
            assert record["kept_tokens"] == record["input_tokens"], (name, record)
        elif name in KEEP_C:
            assert record["kept_tokens"] == pytest.approx(C, abs=0.5), (name, record)
        elif name == "chunkkv":  # max(1, chunks·C/n) whole chunks of 20: on a short prompt, one (maybe the short last)
            assert 0 < record["kept_tokens"] < C + 20, (name, record)
        else:  # duo_attention, simlayerkv: some heads or layers keep more than C
            assert C / 2 <= record["kept_tokens"] <= record["input_tokens"], (name, record)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("frontier") / "tiny-llama-frontier")


@pytest.mark.parametrize("name", NEW)
def test_longbench_runner(name: str, checkpoint: Path, tmp_path: Path) -> None:
    from kvfactory.benchmarks.longbench import run
    from run_longbench import build_parser
    from tests.test_longbench_runner import _synthetic_data

    folder = run(build_parser().parse_args([
        "--model_path", str(checkpoint), "--data_dir", str(_synthetic_data(tmp_path / "data")), "--save_dir",
        str(tmp_path / "out"), "--datasets", "multifieldqa_en", "--max_num_examples", "1", "--max_length", "96",
        "--method", name, "--max_capacity_prompts", str(C)]))
    check_kept(name, lines(folder / "multifieldqa_en" / f"{name}.jsonl"))
    assert json.loads((folder / f"run_meta_{name}.json").read_text())["settings"]["method"] == name


@pytest.mark.parametrize("name", NEW)
def test_ruler_runner(name: str, smollm2_sized_model, smollm2_tokenizer, tmp_path: Path) -> None:
    import run_ruler
    from kvfactory.benchmarks.ruler import runner

    args = run_ruler.build_parser().parse_args([
        "--model_path", "smollm2-135m", "--method", name, "--max_capacity_prompts", str(C), "--context_lengths", "512",
        "--tasks", "niah_single_1", "--num_samples", "1", "--max_new_tokens", "3", "--save_dir", str(tmp_path)])
    run = runner.run_ruler(args, smollm2_sized_model, smollm2_tokenizer)
    assert run.generated == {name: 1}
    check_kept(name, lines(run.run_dir / "512" / "niah_single_1" / f"{name}.jsonl"))
    assert set(run.scores[name]) == {"512/niah_single_1", "512/average", "average"}


@pytest.mark.parametrize("name", NEW)
def test_passkey_runner(name: str, smollm2_sized_model, smollm2_tokenizer, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import run_passkey
    from kvfactory.benchmarks import common

    monkeypatch.setattr(common, "load_model", lambda args: (smollm2_sized_model, smollm2_tokenizer))
    assert run_passkey.main(["--model_path", "smollm2-135m", "--method", name, "--max_capacity_prompts", str(C),
                             "--lengths", "96", "--depths", "50", "--haystack", "synthetic", "--max_new_tokens", "3",
                             "--save_dir", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("96")]
    assert len(rows) == 1 and rows[0][-1] in ("0/1", "1/1")  # the grid's table: one length, one depth
    records = lines(tmp_path / f"smollm2-135m_{C}" / f"{name}.jsonl")
    assert [r["_id"] for r in records] == ["96-50-0"]
    check_kept(name, records)


def test_needle_passkey_table(tmp_path: Path) -> None:
    """benchmarks/frontier_needle_passkey_table.py: one row per method in the docs' order, misses with their answer."""
    from benchmarks.frontier_needle_passkey_table import markdown

    (tmp_path / "passkey" / "m_128").mkdir(parents=True)
    for method, preds in (("tova", [" 60494.", " 6049."]), ("fullkv", [" 60494", " 60494"])):
        (tmp_path / "passkey" / "m_128" / f"{method}.jsonl").write_text("".join(
            json.dumps({"depth": depth, "passkey": "60494", "pred": pred}) + "\n" for depth, pred in zip((0, 50), preds)))
    (tmp_path / "needle" / "m_tova_128").mkdir(parents=True)
    for depth, recall in ((0, 1.0), (100, 0.5)):
        (tmp_path / "needle" / "m_tova_128" / f"len_1000_depth_{depth * 100}_results.json").write_text(json.dumps(
            {"method": "tova", "depth_percent": float(depth), "recall": recall}))
    header, rule, fullkv, tova = markdown(tmp_path).splitlines()
    assert header.startswith("| method | passkey 0% |") and rule.count("---") == 13
    assert fullkv == "| `fullkv` | 1 | - | 1 | - | - | 2/2 | - | - | - | - | - | - |"
    assert tova == "| `tova` | 1 | - | 0 (`6049.`) | - | - | 1/2 | 1.00 | - | - | - | 0.50 | 0.75 |"
