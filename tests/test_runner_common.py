"""Shared runner plumbing: arguments → patch parameters, resumable results, provenance."""
from __future__ import annotations

import argparse
import json

import pytest

from kvfactory import methods
from kvfactory.benchmarks.common import (
    ResultsFile, add_method_arguments, add_model_arguments, budget_label, method_label, patch_parameters,
    write_run_meta,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_method_arguments(parser)
    return parser.parse_args(list(argv))


def test_kvcache_factory_arguments_map_to_patch_parameters() -> None:
    name, params = patch_parameters(
        parse("--method", "SnapKV", "--max_capacity_prompts", "128", "--window_size", "16", "--merge", "pivot"))
    assert name == "snapkv" and params == {"max_capacity_prompt": 128, "window_size": 16, "merge": "pivot"}
    methods.get(name, **params)
    assert patch_parameters(parse("--method", "fullkv")) == ("fullkv", {})
    assert patch_parameters(parse("--method", "pyramidkv", "--max_capacity_prompts_ratio", "0.25"))[1] == {
        "max_capacity_prompt_ratio": 0.25}
    assert patch_parameters(parse("--method", "h2o", "--method_kwargs", '{"sink_size": 4}'))[1] == {
        "max_capacity_prompt": 512, "sink_size": 4}


def test_bad_combinations_are_errors() -> None:
    with pytest.raises(ValueError, match="always caches KV heads"):
        patch_parameters(parse("--kv_cache_granularity", "query_head"))
    with pytest.raises(ValueError, match="--nbits needs --quant_method"):
        patch_parameters(parse("--method", "snapkv", "--nbits", "4"))
    name, params = patch_parameters(parse("--method", "streamingllm", "--window_size", "8"))
    with pytest.raises(ValueError, match="does not accept window_size"):
        methods.get(name, **params)
    with pytest.raises(ValueError, match="unknown method"):
        patch_parameters(parse("--method", "snapkvv"))


def test_labels() -> None:
    assert budget_label(parse("--max_capacity_prompts", "128")) == "128"
    assert budget_label(parse("--max_capacity_prompts_ratio", "0.25")) == "ratio0.25"
    assert method_label("snapkv", {"merge": "pivot", "quant_method": "kivi", "nbits": 2}) == "snapkv_merge-pivot_kivi2"


def test_results_file_resumes_and_repairs_a_crash(tmp_path) -> None:
    path = tmp_path / "run" / "snapkv.jsonl"
    results = ResultsFile(path, key="_id")
    results.append({"_id": "a", "pred": "x"})
    results.append({"_id": "b", "pred": "y"})
    with open(path, "a", encoding="utf-8") as handle:  # a crash in the middle of writing the third record
        handle.write('{"_id": "c", "pred": "z')
    resumed = ResultsFile(path, key="_id")
    assert [r["_id"] for r in resumed.records] == ["a", "b"]
    assert resumed.done("a") and not resumed.done("c")
    resumed.append({"_id": "c", "pred": "z"})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["_id"] for line in lines] == ["a", "b", "c"]


def test_run_meta_has_provenance(tmp_path) -> None:
    meta = json.loads(write_run_meta(tmp_path, parse("--method", "snapkv")).read_text())
    assert {"git_commit", "args", "torch", "transformers", "kvfactory", "device", "timestamp"} <= set(meta)
    assert meta["args"]["method"] == "snapkv"


def test_run_jobs_batches_resumes_and_records(tmp_path) -> None:
    import kvfactory
    from kvfactory.benchmarks.common import Job, run_jobs
    from tests.conftest import tiny_model

    class Tokenizer:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    jobs = [Job(key=f"s{i}", input_ids=list(range(3, 30 + 5 * i)), max_new_tokens=4, stop_token_ids=[127],
                record={"answers": ["x"]}) for i in range(3)]
    jobs.append(Job(key="agnostic", input_ids=list(range(3, 40)), question_ids=[5, 6, 7], max_new_tokens=4,
                    stop_token_ids=[127]))
    results = ResultsFile(tmp_path / "out.jsonl", key="_id")
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16) as handle:
        assert run_jobs(model, Tokenizer(), handle, jobs, results, batch_size=2) == 4
        assert run_jobs(model, Tokenizer(), handle, jobs, ResultsFile(tmp_path / "out.jsonl", key="_id")) == 0
    records = {r["_id"]: r for r in ResultsFile(tmp_path / "out.jsonl", key="_id").records}
    assert set(records) == {"s0", "s1", "s2", "agnostic"}
    assert records["s1"]["answers"] == ["x"] and records["s1"]["kept_tokens"] == 16
    assert records["agnostic"]["input_tokens"] == 40 and len(records["agnostic"]["pred"].split()) <= 4


def test_stop_tokens_collect_every_end_of_sequence() -> None:
    from kvfactory.benchmarks.common import model_stop_token_ids

    class Tokenizer:
        eos_token_id, unk_token_id = 2, 0

        def get_vocab(self):
            return {"<|endoftext|>": 0, "<|im_end|>": 2, "<|eot_id|>": 9, "hello": 5}

    class Model:
        class generation_config:  # noqa: N801
            eos_token_id = [2, 7]

    assert model_stop_token_ids(Model(), Tokenizer()) == [2, 7, 9]
