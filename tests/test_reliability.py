"""Issue 19: results files that survive kills, corrupt lines and concurrent writers; one resume rule; clear errors."""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from kvfactory import methods
from kvfactory.benchmarks.common import (ResultsFile, add_method_arguments, add_model_arguments, ensure_folder,
                                         patch_parameters)
from kvfactory.benchmarks.locking import FileLock, LockTimeout, atomic_write_text, remove_stale_temporaries
from kvfactory.benchmarks.provenance import SettingsMismatch, record_run


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_method_arguments(parser)
    return parser.parse_args(list(argv))


def keys(path: Path) -> list[str]:
    return [json.loads(line)["_id"] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ results files
def test_a_corrupt_middle_line_drops_only_itself_and_names_file_and_line(tmp_path, caplog) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"_id": "a"}\n{"_id": "b", "pred": \n{"_id": "c"}\n["not an object"]\n{"_id": "d"}\n')
    with caplog.at_level(logging.WARNING):
        results = ResultsFile(path, key="_id")
    assert [r["_id"] for r in results.records] == ["a", "c", "d"]
    assert not results.done("b") and results.done("d")
    assert f"{path}:2" in caplog.text and f"{path}:4" in caplog.text
    assert keys(path) == ["a", "c", "d"]  # rewritten with every valid line, atomically
    results.append({"_id": "b", "pred": "recomputed"})
    assert keys(path) == ["a", "c", "d", "b"]


def test_repeated_keys_keep_the_first_and_a_truncated_tail_is_dropped(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"_id": "a", "pred": "1"}\n{"_id": "a", "pred": "2"}\n{"_id": "b"}\n{"_id": "c", "pr')
    results = ResultsFile(path, key="_id")
    assert [(r["_id"], r.get("pred")) for r in results.records] == [("a", "1"), ("b", None)]
    assert path.read_text() == '{"_id": "a", "pred": "1"}\n{"_id": "b"}\n'
    complete_but_unterminated = tmp_path / "n.jsonl"
    complete_but_unterminated.write_text('{"_id": "a"}\n{"_id": "b"}')  # killed before the newline
    assert [r["_id"] for r in ResultsFile(complete_but_unterminated, key="_id").records] == ["a"]


def test_append_never_writes_a_key_another_writer_wrote(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    first, second = ResultsFile(path, key="_id"), ResultsFile(path, key="_id")  # both saw an empty file
    assert first.append({"_id": "a", "pred": "x"})
    assert not second.append({"_id": "a", "pred": "x"})  # read in under the lock, not written twice
    assert second.append({"_id": "b", "pred": "y"})
    first.refresh()
    assert first.done("b") and keys(path) == ["a", "b"]


def test_a_writer_killed_mid_line_does_not_corrupt_the_next_append(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    results = ResultsFile(path, key="_id")
    results.append({"_id": "a"})
    with open(path, "a") as handle:  # another process died in the middle of its line
        handle.write('{"_id": "b", "pr')
    results.append({"_id": "c"})
    assert keys(path) == ["a", "c"]


def test_a_repair_by_another_process_is_noticed(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    old = ResultsFile(path, key="_id")
    old.append({"_id": "a"})
    with open(path, "a") as handle:
        handle.write("garbage\n")
    ResultsFile(path, key="_id")  # repairs: the file is replaced (new inode)
    assert old.append({"_id": "b"}) and keys(path) == ["a", "b"]


def _append_many(path: str, worker: int) -> None:
    results = ResultsFile(Path(path), key="_id")
    for i in range(40):
        results.append({"_id": f"k{i}", "worker": worker, "pad": "x" * (i * 50)})


def test_concurrent_processes_append_each_key_once(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), n)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert sorted(keys(path)) == sorted(f"k{i}" for i in range(40))


def test_lock_says_who_holds_it_and_atomic_writes_leave_no_temporaries(tmp_path) -> None:
    lock = FileLock(tmp_path / "x.lock")
    with lock:
        with pytest.raises(LockTimeout, match=f"pid {os.getpid()} on "):
            FileLock(tmp_path / "x.lock", timeout=0).acquire()
        with lock:  # re-entrant for its holder
            pass
    with FileLock(tmp_path / "x.lock", timeout=0):
        pass
    atomic_write_text(tmp_path / "f.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "x.lock"]
    (tmp_path / ".f.json.999999999.tmp").write_text("left by a killed writer")
    assert remove_stale_temporaries(tmp_path) == 1 and not (tmp_path / ".f.json.999999999.tmp").exists()


# ------------------------------------------------------------------------------------------------ resume rule
def _settings(**changes):
    base = {"model_path": "m", "dtype": "float32", "method": "snapkv", "params": {"window_size": 8},
            "max_num_examples": 4, "data": {"a.jsonl": {"size": 1, "sha256": "x"}}}
    return {**base, **changes}


def test_settings_are_fixed_history_is_appended_and_mismatches_refused(tmp_path) -> None:
    meta, results = tmp_path / "run_meta_snapkv.json", {"exist": False}
    has = lambda: results["exist"]  # noqa: E731
    record_run(meta, _settings(), args=parse("--method", "snapkv"), has_results=has)
    results["exist"] = True
    grown = record_run(meta, _settings(max_num_examples=None, data={"b.jsonl": {"size": 2, "sha256": "y"}}),
                       args=parse("--method", "snapkv", "--seed", "1"), has_results=has)
    assert len(grown["history"]) == 2 and grown["args"]["seed"] == 42  # the first run's fields stay on top
    assert grown["settings"]["max_num_examples"] is None and set(grown["settings"]["data"]) == {"a.jsonl", "b.jsonl"}
    for changes, message in (({"params": {"window_size": 4}}, "params"),
                             ({"max_num_examples": 3}, "may only extend"),
                             ({"data": {"a.jsonl": {"size": 1, "sha256": "z"}}}, r"data\[a.jsonl\]"),
                             ({"dtype": "bfloat16"}, "dtype: 'float32' -> 'bfloat16'")):
        with pytest.raises(SettingsMismatch, match=message):
            record_run(meta, {**_settings(max_num_examples=None), **changes}, args=None, has_results=has)
    assert len(json.loads(meta.read_text())["history"]) == 2  # refusals record nothing
    results["exist"] = False  # a run stopped before its first record blocks nothing
    replaced = record_run(meta, _settings(params={"window_size": 4}), args=None, has_results=has)
    assert replaced["settings"]["params"] == {"window_size": 4} and len(replaced["history"]) == 1


def test_auto_dtype_compares_as_its_resolved_value() -> None:
    from kvfactory.benchmarks.provenance import model_settings

    assert model_settings(parse("--dtype", "auto"))["dtype"] == model_settings(parse("--dtype", "float32"))["dtype"]


# ------------------------------------------------------------------------------------------------ budgets, types
@pytest.mark.parametrize("argv, message", [
    (("--max_capacity_prompts", "0"), "positive number of tokens"),
    (("--max_capacity_prompts", "-5"), "positive number of tokens"),
    (("--max_capacity_prompts", "-1"), "no ratio was given"),
    (("--max_capacity_prompts_ratio", "1.5"), r"\(0, 1\]"),
    (("--method_kwargs", '{"kernel_size": 5'), "must be a JSON object"),
])
def test_invalid_budgets_and_kwargs_are_errors(argv, message) -> None:
    with pytest.raises(ValueError, match=message):
        patch_parameters(parse("--method", "snapkv", *argv))


def test_minus_one_with_a_ratio_is_kvcache_factorys_ratio_mode() -> None:
    assert patch_parameters(parse("--method", "snapkv", "--max_capacity_prompts", "-1",
                                  "--max_capacity_prompts_ratio", "0.25"))[1] == {"max_capacity_prompt_ratio": 0.25}


@pytest.mark.parametrize("name, params, message", [
    ("snapkv", {"max_capacity_prompt": 64.0}, "max_capacity_prompt must be int"),
    ("snapkv", {"max_capacity_prompt": "64"}, "max_capacity_prompt must be int"),
    ("snapkv", {"max_capacity_prompt": True}, "max_capacity_prompt must be int"),
    ("snapkv", {"kernel_size": 2.5}, "kernel_size must be int"),
    ("snapkv", {"kernel_size": "5"}, r"got '5' \(str\)"),
    ("l2norm", {"skip_layers": "ab"}, "skip_layers must be list"),
    ("adakv", {"floor_ratio": "0.2"}, "floor_ratio must be float"),
])
def test_method_parameters_are_type_checked_when_built(name, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        methods.get(name, **params)


def test_an_even_kernel_size_pads_as_kvcache_factory() -> None:
    import torch

    method = methods.get("snapkv", kernel_size=4, max_capacity_prompt=16, window_size=4)
    keys_, values = method.compress(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), 0, 2)
    assert keys_.shape == values.shape == (1, 2, 16, 8)


def test_a_save_dir_under_a_file_is_an_error(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ensure_folder(tmp_path / "file" / "results")


# ------------------------------------------------------------------------------------------------ the runners
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from benchmarks.kill_resume import prepare

    return prepare(tmp_path_factory.mktemp("reliability"))


def _main(runner: str):
    from benchmarks.kill_resume import runner_main

    return runner_main(runner)


def _argv(runner: str, workspace: Path, save_dir: Path, *extra: str) -> list[str]:
    from benchmarks.kill_resume import runner_argv

    return [*runner_argv(runner, workspace, save_dir), *extra]


def _refused(runner, argv, capsys, message) -> None:
    with pytest.raises(SystemExit) as stop:
        _main(runner)(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_ruler_resume_with_other_method_settings_is_refused(workspace, tmp_path, capsys) -> None:
    out = tmp_path / "ruler"
    assert _main("ruler")(_argv("ruler", workspace, out, "--num_samples", "2")) == 0
    _refused("ruler", _argv("ruler", workspace, out, "--num_samples", "3", "--window_size", "8"), capsys,
             "window_size")
    meta = json.loads((out / "model_24" / "run_meta_snapkv.json").read_text())
    assert meta["settings"]["params"]["window_size"] == 4 and meta["settings"]["num_samples"] == 2
    lines = (out / "model_24" / "256" / "niah_single_1" / "snapkv.jsonl").read_text().splitlines()
    assert len(lines) == 2  # nothing made with W=8 was added


def test_needle_resume_with_other_method_settings_is_refused_but_the_grid_may_grow(workspace, tmp_path,
                                                                                   capsys) -> None:
    out = tmp_path / "needle"
    base = _argv("needle", workspace, out)
    grid = base.index("--depths")
    one = [*base[:grid], "--depths", "50", *base[grid + 2:]]
    assert _main("needle")(one) == 0
    two = [*base[:grid], "--depths", "25,50", *base[grid + 2:]]
    _refused("needle", [*two, "--window_size", "8"], capsys, "params.window_size: 4 -> 8")
    assert _main("needle")(two) == 0  # the same settings over a larger grid: a resume
    assert "2 cells answered, 2 already there" in capsys.readouterr().out
    folder = next(p for p in out.iterdir() if p.is_dir())
    assert len(json.loads((folder / "run_meta.json").read_text())["history"]) == 2


def test_longbench_provenance_is_kept_and_data_is_fingerprinted(workspace, tmp_path, capsys) -> None:
    import shutil

    out = tmp_path / "lb"
    first = _argv("longbench", workspace, out, "--max_num_examples", "4", "--dtype", "auto")
    assert _main("longbench")(first) == 0
    folder = out / "model_24"
    _refused("longbench", [*first[:-4], "--max_num_examples", "3"], capsys, "may only extend")
    assert _main("longbench")([*first[:-2], "--dtype", "float32"]) == 0  # auto is float32 on CPU: not a change
    other = tmp_path / "other_data"
    shutil.copytree(workspace / "longbench", other)
    with open(other / "multifieldqa_en.jsonl", "a") as handle:
        handle.write("\n")
    moved = list(first)
    moved[moved.index("--data_dir") + 1] = str(other)
    _refused("longbench", moved, capsys, "data[multifieldqa_en.jsonl]")
    meta = json.loads((folder / "run_meta_snapkv.json").read_text())
    assert [entry["args"]["dtype"] for entry in meta["history"]] == ["auto", "float32"]
    assert meta["args"]["dtype"] == "auto" and meta["data_dir"] == str(workspace / "longbench")
    assert len((folder / "multifieldqa_en" / "snapkv.jsonl").read_text().splitlines()) == 4


def test_a_run_stopped_before_its_first_record_blocks_no_other_settings(workspace, tmp_path) -> None:
    out = tmp_path / "lb"
    folder = out / "model_24"
    folder.mkdir(parents=True)
    (folder / "run_meta_snapkv.json").write_text(json.dumps({"settings": {"params": {"window_size": 99}}}))
    assert _main("longbench")(_argv("longbench", workspace, out, "--max_num_examples", "1")) == 0
    assert json.loads((folder / "run_meta_snapkv.json").read_text())["settings"]["params"]["window_size"] == 4


# ------------------------------------------------------------------------------------------------ one-line errors
def _one_line_error(call, capsys, *needles: str) -> None:
    """``call()`` ends with exit status 2 and a stderr naming every needle, without a traceback."""
    try:
        code = call()
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def _no_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is None


@pytest.mark.parametrize("runner", ["longbench", "ruler", "needle"])
def test_runner_errors_name_the_flag(runner, workspace, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    main = _main(runner)
    if _no_flash_attn():
        _one_line_error(lambda: main(_argv(runner, workspace, out, "--attn_implementation", "flash_attention_2")),
                        capsys, "--attn_implementation flash_attention_2", "eager, sdpa")
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: main([*_argv(runner, workspace, out), "--save_dir", str(tmp_path / "file" / "sub")]),
                    capsys, "--save_dir", "is a file")
    _one_line_error(lambda: main(_argv(runner, workspace, out, "--method_kwargs", '{"kernel_size": "5"}')), capsys,
                    "kernel_size must be int")
    _one_line_error(lambda: main(_argv(runner, workspace, out, "--model_path", str(tmp_path / "nowhere"))), capsys,
                    str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(lambda: main(_argv(runner, workspace, out, "--model_path", "some-org/some-model")), capsys,
                    "some-org/some-model", "no model hub")
    _one_line_error(lambda: main(_argv(runner, workspace, out, "--max_capacity_prompts", "0")), capsys,
                    "--max_capacity_prompts must be a positive number")


def test_needle_depth_out_of_range_and_a_malformed_jsonl_line(workspace, tmp_path, capsys) -> None:
    import shutil

    _one_line_error(lambda: _main("needle")(_argv("needle", workspace, tmp_path, "--depths", "150")), capsys,
                    "--depths are percentages in [0, 100], got 150")
    data = tmp_path / "data"
    shutil.copytree(workspace / "longbench", data)
    with open(data / "multifieldqa_en.jsonl", "a") as handle:
        handle.write('{"_id": "broken", \n')
    argv = _argv("longbench", workspace, tmp_path / "out")
    argv[argv.index("--data_dir") + 1] = str(data)
    _one_line_error(lambda: _main("longbench")(argv), capsys, f"{data / 'multifieldqa_en.jsonl'}:7: not valid JSON")


def test_speed_ppl_and_main_errors_are_one_line(tmp_path, capsys) -> None:
    import run_ppl
    import run_speed

    from kvfactory.__main__ import main as kvfactory_main

    _one_line_error(lambda: run_speed.main(["--context_lengths", "abc"]), capsys, "--context_lengths", "abc")
    _one_line_error(lambda: run_speed.main(["--model_path", str(tmp_path / "nowhere"), "--context_lengths", "8"]),
                    capsys, "--model_path", str(tmp_path / "nowhere"))
    _one_line_error(lambda: run_ppl.main(["suffix", "--model_path", "random:tiny-llama", "--data_dir",
                                          str(tmp_path / "no_data")]), capsys, str(tmp_path / "no_data"))
    if _no_flash_attn():
        _one_line_error(lambda: kvfactory_main(["--model_path", "random:tiny-llama", "--attn_implementation",
                                                "flash_attention_2"]), capsys, "flash-attn")
    _one_line_error(lambda: kvfactory_main(["--methods", "snapkvv"]), capsys, "unknown method 'snapkvv'")


# ------------------------------------------------------------------------------------------------ shell wrappers
REPO = Path(__file__).resolve().parent.parent


def _fake_python(folder: Path) -> Path:
    """Stands in for python: reports no GPU, prints its working folder and arguments."""
    fake = folder / "python"
    fake.write_text('#!/usr/bin/env bash\n[ "$1" = "-c" ] && exit 1\necho "$PWD" "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("script, runner", [("scripts/longbench/eval.sh", "run_longbench.py"),
                                            ("scripts/needle/eval.sh", "run_needle.py")])
def test_eval_wrappers_keep_relative_paths_relative_to_the_caller(script, runner, tmp_path) -> None:
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(_fake_python(tmp_path))}
    done = subprocess.run(["bash", str(REPO / script), "cpu", "snapkv", "96", "--save_dir", "mine"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[0] == str(tmp_path) and words[1] == str(REPO / runner)  # run from the caller's folder
    assert "mine" in words and not (REPO / "mine").exists()


def test_ruler_wrappers_run_from_the_callers_folder(tmp_path) -> None:
    import subprocess

    fake = _fake_python(tmp_path)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = subprocess.run(["bash", str(REPO / "scripts/ruler/metrics.sh"), "results_ruler/x_128"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path), str(REPO / "run_ruler.py"), "--eval", "--results_dir",
                                   "results_ruler/x_128"]
    assert fake.is_file()


def test_download_longbench_link_refuses_a_real_folder_and_offline_leaves_nothing(tmp_path) -> None:
    import os
    import subprocess

    source = tmp_path / "copy"
    (source / "config").mkdir(parents=True)
    (source / "a.jsonl").write_text("{}\n")
    existing = tmp_path / "data" / "LongBench"
    existing.mkdir(parents=True)
    env = {**os.environ, "LONGBENCH_LINK": str(existing)}
    done = subprocess.run(["bash", str(REPO / "scripts/download_longbench.sh"), "--link", "copy"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "is not a link" in done.stderr and list(existing.iterdir()) == []
    existing.rmdir()
    done = subprocess.run(["bash", str(REPO / "scripts/download_longbench.sh"), "--link", "copy"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # relative to the caller
    assert done.returncode == 0, done.stderr
    assert existing.is_symlink() and existing.resolve() == source.resolve()
    offline = {**os.environ, "LONGBENCH_CONFIG_URL": f"file://{tmp_path}/nowhere"}
    done = subprocess.run(["bash", str(REPO / "scripts/download_longbench.sh"), "fetched"], capture_output=True,
                          text=True, env=offline, cwd=tmp_path)
    assert done.returncode == 1 and "could not fetch" in done.stderr
    assert not (tmp_path / "fetched").exists()  # no empty config/ left behind


# ------------------------------------------------------------------------------------------------ numerics
def test_kivi_groups_beyond_fp16_range_dequantize_finite() -> None:
    import torch

    from kvfactory.quant.groups import quantize

    values = torch.randn(1, 2, 32, 8)
    values[0, 0, 0, 0], values[0, 0, 1, 0] = 1e5, -1e5  # one group spans +-1e5: its step is 66667, above fp16's max
    for layout in ("channel", "token"):
        quantized = quantize(values, 2, layout, 8 if layout == "token" else 32)
        restored = quantized.dequantize()
        assert torch.isfinite(restored).all() and quantized.scale.dtype == torch.float32
        assert ((restored - values).abs() <= quantized.scale.float().amax() / 2 + 1e-2).all()
    ordinary = quantize(torch.randn(1, 2, 32, 8), 2, "channel", 32)
    assert ordinary.scale.dtype == torch.float16  # the usual case keeps KIVI's fp16 side data
