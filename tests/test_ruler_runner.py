"""RULER runner: generate → answer → score on a tiny model with SmolLM2's tokenizer, resume, replay, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import run_ruler
from kvfactory.benchmarks import ruler
from kvfactory.benchmarks.ruler import runner
from kvfactory.metrics import ruler as metrics


def parse(*argv: str):
    return run_ruler.build_parser().parse_args(list(argv))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_answer_score_and_resume(smollm2_sized_model, smollm2_tokenizer, tmp_path: Path) -> None:
    args = parse("--model_path", "smollm2-135m", "--method", "fullkv,snapkv", "--max_capacity_prompts", "64",
                 "--context_lengths", "512", "--tasks", "niah_single_1,fwe,qa_1",
                 "--num_samples", "3", "--eval_batch_size", "2", "--max_new_tokens", "4",
                 "--save_dir", str(tmp_path))
    run = runner.run_ruler(args, smollm2_sized_model, smollm2_tokenizer)
    assert run.run_dir == tmp_path / "smollm2-135m_64"
    assert run.generated == {"fullkv": 6, "snapkv": 6}
    assert "--qa_data" in run.skipped["512/qa_1"] and "squad.json" in run.skipped["512/qa_1"]
    data = tmp_path / "data" / "smollm2-135m" / "base_seed42" / "512" / "niah_single_1.jsonl"
    samples = ruler.read_jsonl(data)
    assert [list(s) for s in samples] == [["index", "input", "outputs", "length"]] * 3
    for task in ("niah_single_1", "fwe"):
        folder = run.run_dir / "512" / task
        assert json.loads((folder / "metrics.json").read_text()).keys() == {"fullkv", "snapkv"}
        records = lines(folder / "snapkv.jsonl")
        assert [r["index"] for r in records] == [0, 1, 2]
        assert all(r["kept_tokens"] == 64 and r["input_tokens"] > 64 and isinstance(r["pred"], str) for r in records)
    truth = ruler.read_jsonl(run.run_dir.parent / "data/smollm2-135m/base_seed42/512/fwe.jsonl")
    assert [r["outputs"] for r in lines(run.run_dir / "512/fwe/fullkv.jsonl")] == [t["outputs"] for t in truth]
    with open(run.run_dir / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["method", "512/niah_single_1", "512/fwe", "512/average", "average"]
    assert [row[0] for row in rows[1:]] == ["fullkv", "snapkv"]
    for method in ("fullkv", "snapkv"):
        meta = json.loads((run.run_dir / f"run_meta_{method}.json").read_text())
        assert meta["args"]["method"] == "fullkv,snapkv" and meta["settings"]["method"] == method
        assert set(meta["settings"]["data"]) == {"512/niah_single_1", "512/fwe"}

    # a crash in the middle of writing snapkv's last fwe answer: the rerun answers only that one
    path = run.run_dir / "512" / "fwe" / "snapkv.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rindex("{") + 12])
    stamp = data.stat().st_mtime_ns
    again = runner.run_ruler(args, smollm2_sized_model, smollm2_tokenizer)
    assert again.generated == {"fullkv": 0, "snapkv": 1}
    assert data.stat().st_mtime_ns == stamp  # exactly num_samples lines: the generated file is reused
    assert [r["index"] for r in lines(path)] == [0, 1, 2]
    assert again.scores == run.scores


def test_replay_ruler_format_files(smollm2_sized_model, smollm2_tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "RULER"
    kvcf = [{"index": i, "input": f"The pass code {i} is {1000 + i}. What is pass code {i}? It is",
             "outputs": [str(1000 + i)], "length": 40} for i in range(4)]
    ruler.write_jsonl(kvcf, data / "1024" / "niah_single_1.jsonl")  # KVCache-Factory's data/RULER layout
    ruler.write_jsonl([{"index": 7, "input": "Say hi.", "outputs": "hi", "length": 9}],
                      data / "1024" / "vt" / "validation.jsonl")  # RULER's own layout, a bare string answer
    args = parse("--method", "streamingllm", "--max_capacity_prompts", "16", "--context_lengths", "1024",
                 "--tasks", "niah_single_1,vt,cwe", "--num_samples", "3", "--data_dir", str(data),
                 "--max_new_tokens", "3", "--save_dir", str(tmp_path / "out"), "--model_path", "smollm2-135m")
    run = runner.run_ruler(args, smollm2_sized_model, smollm2_tokenizer)
    assert run.generated == {"streamingllm": 4} and "no RULER file to replay" in run.skipped["1024/cwe"]
    records = lines(run.run_dir / "1024" / "niah_single_1" / "streamingllm.jsonl")
    assert [(r["index"], r["outputs"], r["length"]) for r in records] == [(i, [str(1000 + i)], 40) for i in range(3)]
    assert lines(run.run_dir / "1024" / "vt" / "streamingllm.jsonl")[0]["outputs"] == ["hi"]
    assert set(run.scores["streamingllm"]) == {"1024/niah_single_1", "1024/vt", "1024/average", "average"}
    assert not (tmp_path / "out" / "data").exists()  # nothing generated

    (data / "1024" / "niah_single_1.jsonl").write_text('{"index": 0, "outputs": ["1"]}\n')
    with pytest.raises(ValueError, match="record 1 is not a RULER sample .no input string"):
        runner.run_ruler(args, smollm2_sized_model, smollm2_tokenizer)


def test_chat_template_wrapper(smollm2_tokenizer) -> None:
    wrapper = runner.chat_wrapper(smollm2_tokenizer)
    assert wrapper.startswith("<|im_start|>") and wrapper.endswith("{task_template}<|im_end|>\n<|im_start|>assistant\n")
    record = ruler.generate("niah_multikey_2", smollm2_tokenizer, 1024, 1, template=wrapper)[0]
    assert record["input"].startswith("<|im_start|>system\n")
    assert "<|im_end|>\n<|im_start|>assistant\n The special magic number for " in record["input"]
    assert record["length"] <= 1024 and record["outputs"][0] in record["input"]
    single = ruler.generate("niah_single_1", smollm2_tokenizer, 1024, 1, template=wrapper)[0]["input"]
    assert single.startswith(wrapper.split("{task_template}")[0] + "A special magic number is hidden")  # "You are" kept
    assert single.endswith("<|im_start|>assistant\n The special magic number for " + single.split(" for ")[-1])
    assert runner.resolve_template("meta-chat", smollm2_tokenizer) == "meta-chat"


def test_bad_arguments_are_errors(smollm2_sized_model, smollm2_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown RULER task.*niah_single_9.*accepted: all or niah_single_1"):
        runner.parse_tasks("vt,niah_single_9")
    assert runner.parse_tasks("all") == list(ruler.TASKS)
    for bad in ("", "4k", "1024,-5"):
        with pytest.raises(ValueError, match="positive integers"):
            runner.parse_lengths(bad)
    with pytest.raises(ValueError, match="unknown --template 'llama9'; accepted: chat, base"):
        runner.resolve_template("llama9", smollm2_tokenizer)

    class NoChat:
        chat_template = None

    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        runner.chat_wrapper(NoChat())
    with pytest.raises(ValueError, match="no braces besides"):
        ruler.generate("vt", smollm2_tokenizer, 1024, 1, template="{x} {task_template}")
    base = ("--save_dir", str(tmp_path), "--context_lengths", "512", "--tasks", "niah_single_1")
    with pytest.raises(ValueError, match="unknown method"):
        runner.run_ruler(parse("--method", "fullkv,snapkvv", *base), smollm2_sized_model, smollm2_tokenizer)
    with pytest.raises(ValueError, match="eval_batch_size"):
        runner.run_ruler(parse("--eval_batch_size", "0", *base), smollm2_sized_model, smollm2_tokenizer)
    with pytest.raises(ValueError, match="comes without a tokenizer"):
        runner.run_ruler(parse("--model_path", "random:tiny-llama", *base), smollm2_sized_model, None)
    with pytest.raises(SystemExit):
        run_ruler.main(["--tasks", "qa_3"])


def test_format_table_and_metrics_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for method, pred in (("fullkv", "1234"), ("snapkv", "none")):
        for task in ("vt", "niah_single_1"):
            path = tmp_path / "2048" / task / f"{method}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"index": 0, "pred": pred, "outputs": ["1234"]}) + "\n")
    assert run_ruler.main(["--eval", "--results_dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| method | 2048/niah_single_1 | 2048/vt | 2048/average | average |"
    assert table[2] == "| fullkv | 100.00 | 100.00 | 100.00 | 100.00 |"
    assert table[3] == "| snapkv | 0.00 | 0.00 | 0.00 | 0.00 |"
    scores = metrics.score_results(tmp_path)
    assert metrics.format_table(scores, seconds={"fullkv": 12.4}).splitlines()[2].endswith("| 12 |")
    capsys.readouterr()
    for argv, message in ((["--eval", "--results_dir", str(tmp_path / "missing")], "missing"),
                          (["--eval", "--results_dir", str(tmp_path / "2048")], "no {length}/{task}/{method}.jsonl"),
                          (["--eval"], "--eval needs --results_dir"),
                          (["--results_dir", str(tmp_path)], "--results_dir is only for --eval")):
        with pytest.raises(SystemExit):
            run_ruler.main(argv)
        assert message in capsys.readouterr().err


def test_scripts(tmp_path: Path) -> None:
    import subprocess

    root = Path(run_ruler.__file__).parent
    usage = subprocess.run(["bash", str(root / "scripts/ruler/eval.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "$3 C (max_capacity_prompts)" in usage.stderr
    bad = subprocess.run(["bash", str(root / "scripts/ruler/eval.sh"), "cpu", "snapkv", "128", "sdpa", f"{tmp_path}/",
                          "smollm2-135m", "none", "", "--tasks", "qa_3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown RULER task(s) qa_3" in bad.stderr  # extra arguments reach the CLI
    path = tmp_path / "4096" / "vt" / "fullkv.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"index": 0, "pred": "VAR ABCDE", "outputs": ["ABCDE"]}) + "\n")
    scored = subprocess.run(["bash", str(root / "scripts/ruler/metrics.sh"), str(tmp_path)], capture_output=True,
                            text=True)
    assert scored.returncode == 0 and "| fullkv | 100.00 | 100.00 | 100.00 |" in scored.stdout
    assert (tmp_path / "results.csv").is_file()
