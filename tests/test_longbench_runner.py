"""LongBench runner: prompt building and token-exact truncation on a fake tokenizer, dataset selection, prompt
lengths, jobs; then end to end through a tiny checkpoint (eval.sh → metrics.sh), resume after a crash, and the
checks that need the shared data (skipped without it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvfactory.benchmarks.longbench import (
    DATASETS, LONGBENCH_E, NO_CHAT_DATASETS, LongBenchConfig, PromptBuilder, load_config, load_records, make_jobs,
    middle_truncate, resolve_max_length, select_datasets, split_template,
)
from benchmarks.kill_resume import tiny_checkpoint
from kvfactory.paths import REPO_ROOT, shared_data_dir

CHAT_TEMPLATE = "{% for m in messages %}<u>{{ m['content'] }}</e>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


class CharTokenizer:
    """One id per character (``ord``), a BOS of 1 by default, specials ``<u>`` 3, ``</e>`` 2, ``<a>`` 4."""

    specials = {"<u>": 3, "</e>": 2, "<a>": 4}
    eos_token_id, unk_token_id, pad_token_id = 2, 0, 2

    def __init__(self, chat_template: str | None = CHAT_TEMPLATE) -> None:
        self.chat_template = chat_template

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            ids.append(self.specials[special] if special else ord(text[i]))
            i += len(special) if special else 1
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<u>{m['content']}</e>" for m in messages) + ("<a>" if add_generation_prompt else "")


def test_middle_truncation_keeps_int_half_of_each_end() -> None:
    ids = list(range(10))
    assert middle_truncate(ids, 10) == ids
    assert middle_truncate(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert middle_truncate(ids, 5) == [0, 1, 8, 9]  # int(5 / 2) == 2 on each side, as pred.py
    with pytest.raises(ValueError, match="at least 2"):
        middle_truncate(ids, 1)


def test_prompt_builder_truncates_content_then_wraps_token_exactly() -> None:
    builder = PromptBuilder.from_tokenizer(CharTokenizer())
    assert builder.chat == ([3], [2, 4]) and builder.plain == ([1], [])
    ids, content = builder.build("abcdefgh", use_chat=True, max_length=4)
    assert ids == [3, ord("a"), ord("b"), ord("g"), ord("h"), 2, 4] and content == 8  # wrapper survives truncation
    ids, _ = builder.build("abcdefgh", use_chat=False, max_length=4)
    assert ids == [1, ord("a"), ord("b"), ord("g"), ord("h")]  # no chat: the tokenizer's own BOS only
    assert builder.overhead(True) == 3 and builder.overhead(False) == 1
    context, question, content = builder.build_split("abcdefgh", "?q", use_chat=True, max_length=6)
    assert context == [3, ord("a"), ord("b"), ord("g"), ord("h")] and question == [ord("?"), ord("q"), 2, 4]
    plain_only = PromptBuilder.from_tokenizer(CharTokenizer(chat_template=None))
    assert plain_only.build("ab", use_chat=True, max_length=8)[0] == [1, ord("a"), ord("b")]


def test_dataset_selection() -> None:
    assert select_datasets(None) == list(DATASETS) and len(DATASETS) == 21
    assert select_datasets(None, longbench_e=True) == [f"{name}_e" for name in LONGBENCH_E] and len(LONGBENCH_E) == 13
    assert select_datasets("multi_news, lcc") == ["multi_news", "lcc"]
    with pytest.raises(ValueError, match="unknown dataset"):
        select_datasets("multi_news,multi_newz")
    with pytest.raises(ValueError, match="LongBench-E tasks"):
        select_datasets("musique", longbench_e=True)  # no E split
    assert NO_CHAT_DATASETS == ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")


def test_prompt_length_resolution() -> None:
    config = LongBenchConfig({}, {}, {"llama2-7b-chat-4k": 3500})
    assert resolve_max_length("x", 8192, config, 64, 10, explicit=2048) == (2048, "--max_length")
    assert resolve_max_length("/m/llama2-7b-chat-4k", 4096, config, 64, 10)[0] == 3500
    assert resolve_max_length("/models/Meta-Llama-3-8B-Instruct", 8192, config, 64, 10)[0] == 7500
    assert resolve_max_length("/mistral/Llama-2-7b-chat-hf", 4096, config, 64, 10)[0] == 3950  # basename only
    assert resolve_max_length("Mistral-7B-Instruct-v0.2", 32768, config, 64, 10)[0] == 31500
    assert resolve_max_length("smollm2-135m", 8192, config, 512, 30) == (
        7650, "max_position_embeddings 8192 - max_gen 512 - wrapper 30")
    with pytest.raises(ValueError, match="pass --max_length"):
        resolve_max_length("smollm2-135m", None, config, 64, 10)


def test_split_template_and_jobs() -> None:
    assert split_template("Read {context}\n\nQ: {input}\nA:") == ("Read {context}", "\n\nQ: {input}\nA:")
    with pytest.raises(ValueError, match="before"):
        split_template("{input} then {context}")
    config = LongBenchConfig({"samsum": "{context}\n\n{input}", "qasper": "C: {context} Q: {input}"},
                             {"samsum": 3, "qasper": 5}, {})
    builder = PromptBuilder.from_tokenizer(CharTokenizer())
    records = [{"_id": f"s{i}", "context": "c" * (5 + i), "input": "q", "answers": ["a"], "length": 9,
                "all_classes": None} for i in range(3)]
    jobs = make_jobs(records, "samsum", config, builder, 100, [2], newline_id=10)
    assert [job.key for job in jobs] == ["s2", "s1", "s0"]  # longest first
    assert jobs[0].stop_token_ids == [2, 10] and jobs[0].min_new_tokens == 1 and jobs[0].max_new_tokens == 3
    assert jobs[0].input_ids[0] == 1 and 3 not in jobs[0].input_ids  # samsum is not chat-wrapped
    assert jobs[0].record == {"answers": ["a"], "all_classes": None, "length": 9, "prompt_tokens": 10,
                              "truncated": False}
    qa = make_jobs(records, "qasper_e", config, builder, 8, [2])
    assert qa[0].input_ids[0] == 3 and qa[0].min_new_tokens == 0 and qa[0].record["truncated"]
    agnostic = make_jobs(records, "qasper", config, builder, 100, [2], query_agnostic=True)
    assert builder.tokenizer.apply_chat_template([{"content": "C: ccccc Q: q"}]) == "<u>C: ccccc Q: q</e><a>"
    assert agnostic[-1].input_ids + agnostic[-1].question_ids == builder.build("C: ccccc Q: q", use_chat=True,
                                                                               max_length=100)[0]
    with pytest.raises(ValueError, match="query-agnostic"):
        make_jobs(records, "samsum", config, builder, 100, [2], newline_id=10, query_agnostic=True)


# ---------------------------------------------------------------- end to end through a tiny checkpoint

SYNTHETIC_PROMPTS = {
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nQuestion: {input}\nAnswer:",
    "samsum": "Summarize the dialogue.\n\n{context}\n\n{input}",
    "qasper": "Article: {context}\n\nQuestion: {input}\n\nAnswer:",
}


def _synthetic_data(folder: Path) -> Path:
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "dataset2prompt.json").write_text(json.dumps(SYNTHETIC_PROMPTS))
    (folder / "config" / "dataset2maxlen.json").write_text(json.dumps({name: 4 for name in SYNTHETIC_PROMPTS}))
    for name in ("multifieldqa_en", "samsum", "qasper_e"):
        with open(folder / f"{name}.jsonl", "w") as handle:
            for i in range(2):
                record = {"input": f"question {i}?", "context": f"Passage {i}: " + "some words here. " * (8 + 6 * i),
                          "answers": [f"answer {i}"], "length": 3000 + 3000 * i, "dataset": name, "language": "en",
                          "all_classes": None, "_id": f"{name}-{i}"}
                handle.write(json.dumps(record) + "\n")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("longbench")
    return {"model": tiny_checkpoint(root / "tiny-llama-lb"), "data": _synthetic_data(root / "data"),
            "out": root / "out"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_sh_runs_then_metrics_sh_scores(workspace) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", "scripts/longbench/eval.sh", "0", "snapkv", "16", "", str(workspace["model"]), "none",
         "--data_dir", str(workspace["data"]), "--save_dir", str(workspace["out"]), "--datasets",
         "multifieldqa_en,samsum", "--max_num_examples", "2", "--eval_batch_size", "2", "--max_length", "96"],
        cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)
    folder = workspace["out"] / "tiny-llama-lb_16"
    records = _read(folder / "multifieldqa_en" / "snapkv.jsonl")
    assert sorted(r["_id"] for r in records) == ["multifieldqa_en-0", "multifieldqa_en-1"]
    assert {"pred", "answers", "all_classes", "length", "input_tokens", "kept_tokens", "seconds", "prompt_tokens",
            "truncated"} <= set(records[0])
    long_one = next(r for r in records if r["_id"] == "multifieldqa_en-1")
    assert long_one["truncated"] and long_one["input_tokens"] == 96 + 1 + 2  # <|user|> ... </s><|assistant|>
    assert long_one["kept_tokens"] == 16
    meta = json.loads((folder / "run_meta_snapkv.json").read_text())
    assert meta["settings"]["params"] == {"max_capacity_prompt": 16} and meta["stop_token_ids"] == [2]
    assert meta["max_length"]["samsum"] == {"max_length": 96, "source": "--max_length"}
    result = subprocess.run(["bash", "scripts/longbench/metrics.sh", str(folder)], cwd=REPO_ROOT, env=env,
                            check=True, capture_output=True, text=True)
    assert "snapkv" in result.stdout
    header, row = (folder / "results.csv").read_text().splitlines()
    assert header == "method,multifieldqa_en,samsum,average,datasets" and row.startswith("snapkv,")
    assert set(json.loads((folder / "samsum" / "metrics.json").read_text())) == {"snapkv"}


def test_resume_after_a_crash_loses_nothing_and_duplicates_nothing(workspace) -> None:
    from kvfactory.benchmarks.longbench import run
    from run_longbench import build_parser

    common = ["--model_path", str(workspace["model"]), "--data_dir", str(workspace["data"]), "--save_dir",
              str(workspace["out"] / "resume"), "--longbench_e", "--datasets", "qasper"]
    folder = run(build_parser().parse_args([*common, "--max_num_examples", "1"]))
    path = folder / "qasper_e" / "fullkv.jsonl"
    first = _read(path)
    assert len(first) == 1 and folder.name == "tiny-llama-lb_512"
    with open(path, "a", encoding="utf-8") as handle:  # killed in the middle of writing the next record
        handle.write('{"_id": "qasper_e-0", "pred": "tr')
    run(build_parser().parse_args(common))
    records = _read(path)
    assert [r["_id"] for r in records] == [first[0]["_id"], next(f"qasper_e-{i}" for i in (0, 1)
                                                                 if f"qasper_e-{i}" != first[0]["_id"])]
    assert records[0] == first[0]  # the finished sample was not redone
    with pytest.raises(ValueError, match="other settings .*max_length"):
        run(build_parser().parse_args([*common, "--max_length", "64"]))
    _, rows = __import__("kvfactory.metrics.longbench", fromlist=["score_results"]).score_results(folder)
    assert set(rows["fullkv"]) >= {"qasper_e/0-4k", "qasper_e/4-8k", "qasper_e/8k+", "average_e/0-4k"}


def test_cli_refuses_bad_values(workspace) -> None:
    from kvfactory.benchmarks.longbench import run
    from run_longbench import build_parser

    base = ["--model_path", str(workspace["model"]), "--data_dir", str(workspace["data"]), "--save_dir",
            str(workspace["out"] / "bad")]
    for extra, message in ((["--kv_cache_granularity", "query_head"], "always caches KV heads"),
                           (["--method", "streamingllm", "--window_size", "8"], "does not accept window_size"),
                           (["--datasets", "nope"], "unknown dataset"),
                           (["--datasets", "narrativeqa"], "narrativeqa.jsonl does not exist"),
                           (["--eval_batch_size", "0"], "at least 1")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(build_parser().parse_args([*base, *extra]))


# ---------------------------------------------------------------- the real data, where this machine has it

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None or not (SHARED / "LongBench").is_dir(),
                                  reason="no shared LongBench data")


@needs_shared
def test_shared_config_has_the_official_templates() -> None:
    config = load_config(SHARED / "LongBench")
    assert set(config.prompts) == set(DATASETS) == set(config.max_gen)
    prompts = config.prompts
    assert "asconcisely" in prompts["narrativeqa"] and "\n\n Answer the question" in prompts["qasper"]
    assert prompts["multi_news"] == ("You are given several news passages. Write a one-page summary of all news. "
                                     "\n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:")
    assert prompts["passage_count"].endswith("The final answer is: ")
    assert prompts["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert config.max_gen["multi_news"] == 512 and config.max_gen["multifieldqa_zh"] == 64
    assert config.model_max_length["llama2-7b-chat-4k"] == 3500
    records = load_records(SHARED / "LongBench", "multi_news", limit=3)
    assert len(records) == 3 and records[0]["input"] == "" and records[0]["all_classes"] is None


def test_query_agnostic_run_compresses_the_context_alone(workspace) -> None:
    from kvfactory.benchmarks.longbench import run
    from run_longbench import build_parser

    folder = run(build_parser().parse_args([
        "--model_path", str(workspace["model"]), "--data_dir", str(workspace["data"]), "--save_dir",
        str(workspace["out"] / "agnostic"), "--datasets", "multifieldqa_en", "--method", "snapkv",
        "--max_capacity_prompts", "16", "--query_agnostic"]))
    records = _read(folder / "multifieldqa_en" / "snapkv.jsonl")
    assert len(records) == 2 and all(r["kept_tokens"] == 16 for r in records)
    assert json.loads((folder / "run_meta_snapkv.json").read_text())["settings"]["query_agnostic"] is True


@needs_shared
def test_real_prompts_are_the_filled_templates_truncated_token_exactly() -> None:
    from kvfactory.models import load_tokenizer

    config = load_config(SHARED / "LongBench")
    record = load_records(SHARED / "LongBench", "multifieldqa_zh", limit=1)[0]
    fake = PromptBuilder.from_tokenizer(CharTokenizer())
    job = make_jobs([record], "multifieldqa_zh", config, fake, 10 ** 6, [2])[0]
    assert job.input_ids == [3, *map(ord, config.prompts["multifieldqa_zh"].format(**record)), 2, 4]
    tokenizer = load_tokenizer("smollm2-135m")
    builder = PromptBuilder.from_tokenizer(tokenizer)
    job = make_jobs([record], "multifieldqa_zh", config, builder, 4096, [2])[0]
    prefix, suffix = builder.chat
    assert len(job.input_ids) == len(prefix) + 4096 + len(suffix) and job.record["truncated"]
    assert job.input_ids[:len(prefix)] == prefix and job.input_ids[-len(suffix):] == suffix
    text = tokenizer.decode(job.input_ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("回答：<|im_end|>\n<|im_start|>assistant\n")
