"""Needle-in-a-haystack runner (kvfactory.benchmarks.needle) and its CLI (run_needle.py): grid, jobs, resume,
end to end with a tiny random model on a tiny generated haystack, heatmaps, and one SmolLM2 check."""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import run_needle
from kvfactory import plots
from kvfactory.benchmarks import needle
from kvfactory.benchmarks import needle_haystack, needle_prompt, needle_scoring
from tests.conftest import tiny_model
from tests.test_needle_protocol import PROMPT_WORDS, SENTENCE, WordTokenizer

REPO = Path(__file__).resolve().parent.parent
ESSAY = " ".join(f"{SENTENCE} " + ("alpha beta ! " if i % 3 == 0 else "gamma delta ? ") for i in range(40))


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer(SENTENCE, PROMPT_WORDS, needle_haystack.NOISE_SENTENCE, chat=True)


def essays(root: Path) -> Path:
    """A tiny generated haystack: two essays of short sentences (the fake tokenizer's words)."""
    folder = root / "essays"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text(ESSAY)
    (folder / "b.txt").write_text(ESSAY.replace("epsilon", "beta"))
    return folder


def make_run(folder: Path, lengths: list[int], depths: list[float], method: str = "snapkv",
             budget: int | None = 16, **kw: Any) -> needle.NeedleRun:
    return needle.NeedleRun(results_dir=folder, lengths=lengths, depths=depths, model="tiny", method=method,
                            budget=budget, version=folder.name, max_new_tokens=4, **kw)


# ------------------------------------------------------------------------------------------------------------- grid
def test_grid_helpers() -> None:
    assert needle.context_lengths(500, 1500, 250) == [500, 750, 1000, 1250, 1500]
    assert len(needle.context_lengths(1000, 8001, 100)) == 71  # KVCF's eval.sh grid
    assert needle.depth_grid(10) == needle_haystack.DEFAULT_DEPTHS
    assert needle.depth_grid(6) == [0, 20, 40, 60, 80, 100] and needle.depth_grid(1) == [50.0]
    with pytest.raises(ValueError, match="larger than"):
        needle.context_lengths(2000, 1000, 100)
    with pytest.raises(ValueError, match="positive"):
        needle.context_lengths(1000, 2000, 0)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        make_run(Path("x"), [100], [120])
    run = make_run(Path("x"), [300, 100, 300], [50, 0])
    assert run.cells == [(100, 0.0), (100, 50.0), (300, 0.0), (300, 50.0)]  # sorted, deduplicated, length-major


def parse(*argv: str) -> argparse.Namespace:
    return run_needle.build_parser().parse_args(list(argv))


def test_cli_grid_arguments() -> None:
    assert run_needle.resolve_grid(parse()) == (needle.context_lengths(1000, 8000, 1000),
                                                needle_haystack.DEFAULT_DEPTHS)
    lengths, depths = run_needle.resolve_grid(parse("-s", "500", "-e", "1500", "--step", "250", "--num_depths", "6"))
    assert lengths == [500, 750, 1000, 1250, 1500] and depths == [0, 20, 40, 60, 80, 100]
    assert run_needle.resolve_grid(parse("--context_lengths", "300,700", "--depths", "0,33.5"))[1] == [0, 33.5]
    assert run_needle.resolve_grid(parse("--depths", "50"))[1] == [50.0]
    for argv, message in [(("--context_lengths", "300", "--step", "5"), "not both"),
                          (("--context_lengths", "3k"), "comma-separated integers"),
                          (("--depths", "a,b"), "comma-separated numbers"),
                          (("--depths", "50", "--num_depths", "3"), "not both")]:
        with pytest.raises(ValueError, match=message):
            run_needle.resolve_grid(parse(*argv))
    assert run_needle.run_budget("fullkv", {}) is None
    assert run_needle.run_budget("snapkv", {"max_capacity_prompt": 128}) == 128
    assert run_needle.run_budget("snapkv", {"max_capacity_prompt_ratio": 0.25}) == "ratio0.25"


# ------------------------------------------------------------------------------------------------------------- jobs
def test_jobs_have_the_exact_length_and_the_needle_at_depth(tokenizer: WordTokenizer, tmp_path: Path) -> None:
    haystack = needle.haystack_ids(tokenizer, "essays", essays(tmp_path), min_tokens=400)
    run = make_run(tmp_path / "run", [150, 400], [0, 50, 100])
    jobs = needle.needle_jobs(tokenizer, run, haystack, [0], skip={needle.cell_key(150, 0)})
    assert [job.key for job in jobs] == ["150@50", "150@100", "400@0", "400@50", "400@100"]
    parts = needle_prompt.prompt_parts(tokenizer)
    needle_ids = tokenizer.encode(needle_haystack.NEEDLE, add_special_tokens=False)
    ends = needle_haystack.sentence_end_token_ids(tokenizer)
    for job in jobs:
        length, depth = job.record["context_length"], job.record["depth_percent"]
        assert len(job.input_ids) == length
        start = len(parts.prefix_ids) + job.record["insertion_index"]
        assert job.input_ids[start:start + len(needle_ids)] == needle_ids
        if depth == 100:  # appended after the whole haystack, as upstream
            assert start + len(needle_ids) == length - len(parts.suffix_ids)
        elif depth > 0:  # walked back to just after a sentence end ("." "!" or "?")
            assert job.input_ids[start - 1] in ends
        assert abs(job.record["actual_depth_percent"] - depth) < 5
    noise = needle.haystack_ids(tokenizer, "noise", min_tokens=400)
    assert len(noise) >= 400 and tokenizer.vocab["."] in noise
    with pytest.raises(ValueError, match="accepted: essays, noise"):
        needle.haystack_ids(tokenizer, "wiki", min_tokens=10)
    with pytest.raises(ValueError, match="smaller than the needle"):
        needle.needle_jobs(tokenizer, make_run(tmp_path / "r2", [40], [0]), haystack, [0])


# ------------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_tiny_model_and_resume(tokenizer: WordTokenizer, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import kvfactory

    model = tiny_model("llama")
    haystack = needle.haystack_ids(tokenizer, "essays", essays(tmp_path), min_tokens=200)
    run = make_run(tmp_path / "snap", [120, 200], [0, 50, 100])
    with kvfactory.patch(model, "snapkv", max_capacity_prompt=16) as handle:
        assert needle.run_needle(model, tokenizer, handle, run, haystack, stop_token_ids=[0], batch_size=3) == 6
        assert needle.run_needle(model, tokenizer, handle, run, haystack, stop_token_ids=[0]) == 0  # resumed
        (run.results_dir / needle_scoring.cell_filename(200, 50)).unlink()
        assert needle.run_needle(model, tokenizer, handle, run, haystack, stop_token_ids=[0]) == 1
        longer_only = make_run(run.results_dir, [200], [0, 50, 100])  # the folder also holds the 120-token cells
        with caplog.at_level("INFO", logger="kvfactory.benchmarks.needle"):
            assert needle.run_needle(model, tokenizer, handle, longer_only, haystack, stop_token_ids=[0]) == 0
        assert "3 of 3 cells already done" in caplog.text
        other = make_run(run.results_dir, [120], [0], method="h2o")
        with pytest.raises(ValueError, match="one results folder per"):
            needle.run_needle(model, tokenizer, handle, other, haystack, stop_token_ids=[0])
        prefixed = make_run(run.results_dir, [120], [0], answer_prefix="The best thing")
        with pytest.raises(ValueError, match="answer_prefix"):  # another prompt: never resumed on top of this run
            needle.run_needle(model, tokenizer, handle, prefixed, haystack, stop_token_ids=[0])
        prefixed.results_dir = tmp_path / "prefixed"
        assert needle.run_needle(model, tokenizer, handle, prefixed, haystack, stop_token_ids=[0]) == 1
    cell = needle_scoring.read_cells(prefixed.results_dir)[0]
    assert cell["answer_prefix"] == "The best thing" and cell["input_tokens"] == 120
    cells = needle_scoring.read_cells(run.results_dir)
    assert [(c["context_length"], c["depth_percent"]) for c in cells] == run.cells
    for cell in cells:
        assert cell["input_tokens"] == cell["context_length"] and cell["kept_tokens"] == 16
        assert 0 <= cell["recall"] <= 1 and 0 <= cell["rouge1_f"] <= 1 and cell["seconds"] > 0
        assert cell["answer"] == cell["answer"].strip() and len(cell["answer"].split()) <= 4
        assert (cell["model"], cell["method"], cell["budget"], cell["version"]) == ("tiny", "snapkv", 16, "snap")
        assert set(needle_scoring.CELL_FIELDS) <= set(cell) and "pred" not in cell and "cell" not in cell
    grid = plots.needle_grid(run.results_dir)
    assert grid.values.shape == (3, 2)
    summary = needle.grid_summary(grid)
    assert summary["mean"] == pytest.approx(float(np.mean([c["recall"] for c in cells])), abs=1e-4)
    assert len(summary["per_depth"]) == 3 and len(summary["per_length"]) == 2
    text = needle.format_summary(grid)
    assert text.splitlines()[1].split() == ["depth", "%", "|", "120", "200", "|", "mean"]


@pytest.fixture()
def fake_loader(monkeypatch: pytest.MonkeyPatch, tokenizer: WordTokenizer) -> None:
    """``run_needle.py`` loads the tiny random Llama with the fake tokenizer instead of a checkpoint."""
    from kvfactory.benchmarks import common

    monkeypatch.setattr(common, "load_model", lambda args: (tiny_model("llama"), tokenizer))


def test_cli_end_to_end_heatmaps_and_comparison(fake_loader: None, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image

    base = ["--model_path", "random:tiny-llama", "--context_lengths", "120,160,200", "--num_depths", "4",
            "--haystack_dir", str(essays(tmp_path)), "--save_dir", str(tmp_path / "out"), "--max_new_tokens", "3",
            "--eval_batch_size", "4"]
    assert run_needle.main([*base, "--method", "streamingllm", "--max_capacity_prompts", "32"]) == 0
    assert run_needle.main([*base, "--method", "fullkv", "--model_version", "full"]) == 0
    printed = capsys.readouterr().out
    assert "12 cells answered" in printed and "mean recall" in printed
    stream, full = tmp_path / "out" / "random-tiny-llama_streamingllm_32", tmp_path / "out" / "full"
    meta = json.loads((stream / "run_meta.json").read_text())
    assert meta["lengths"] == [120, 160, 200] and meta["depths"] == [0, 33, 67, 100]
    assert meta["method_params"] == {"max_capacity_prompt": 32}
    cell = json.loads((full / needle_scoring.cell_filename(160, 33)).read_text())
    assert cell["budget"] is None and cell["kept_tokens"] == 160 and cell["method"] == "fullkv"
    heatmap = matplotlib.image.imread(stream / "needle_heatmap.png")
    assert heatmap.shape[1] > heatmap.shape[0] > 300  # landscape: 3 length columns, 4 depth rows
    assert run_needle.main([*base, "--method", "streamingllm", "--max_capacity_prompts", "32", "--no_plot"]) == 0
    assert "0 cells answered, 12 already there" in capsys.readouterr().out
    assert run_needle.main(["--plot", str(full), str(stream), "--plot_out", str(tmp_path / "cmp.png")]) == 0
    side = matplotlib.image.imread(tmp_path / "cmp.png")
    assert side.shape[1] > 1.5 * side.shape[0]  # two panels side by side
    assert run_needle.main(["--plot", str(full), str(stream), "--layout", "vertical"]) == 0
    stacked = matplotlib.image.imread(tmp_path / "out" / "needle_comparison.png")
    assert stacked.shape[0] > side.shape[0]
    done = subprocess.run(["bash", str(REPO / "scripts/needle/visualize.sh"), str(stream), str(full), "--plot_out",
                           str(tmp_path / "sh.png")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "sh.png").is_file()


def test_shell_scripts(tmp_path: Path) -> None:
    for script in ("scripts/needle/eval.sh", "scripts/needle/visualize.sh", "scripts/download_essays.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    usage = subprocess.run(["bash", str(REPO / "scripts/needle/eval.sh"), "0"], capture_output=True, text=True)
    assert usage.returncode != 0 and "bash scripts/needle/eval.sh GPUS METHOD C [MODEL_PATH]" in usage.stderr
    echo = tmp_path / "python"  # stands in for python: prints its arguments, reports no GPU
    echo.write_text('#!/usr/bin/env bash\n[ "$1" = "-c" ] && exit 1\necho "$@"\n')
    echo.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(echo), "SAVE_DIR": str(tmp_path / "res")}
    done = subprocess.run(["bash", str(REPO / "scripts/needle/eval.sh"), "cpu", "snapkv", "96", "none", "500", "1500",
                           "250", "--num_depths", "6"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(REPO / "run_needle.py"), "--method", "snapkv", "--max_capacity_prompts", "96",
                                   "--save_dir", str(tmp_path / "res"), "--s_len", "500", "--e_len", "1500",
                                   "--step", "250", "--num_depths", "6"]
    assert (tmp_path / "res" / "logs" / "smollm2-135m_snapkv_96.log").read_text() == done.stdout
    folder = tmp_path / "essays"
    folder.mkdir()
    for i in range(49):
        (folder / f"e{i}.txt").write_text("An essay.")
    done = subprocess.run(["bash", str(REPO / "scripts/download_essays.sh"), str(folder)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "nothing to do" in done.stdout  # no network needed when the essays are there


def test_cli_errors_name_the_fix(fake_loader: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(needle_haystack, "default_haystack_dir", lambda: None)
    for argv, message in [((), "--haystack noise"),
                          (("--haystack_dir", str(tmp_path / "none")), "does not exist"),
                          (("--haystack", "noise", "--haystack_dir", str(tmp_path)), "needs no files"),
                          (("--haystack", "noise", "--method", "bogus"), "accepted methods"),
                          (("--plot", str(tmp_path / "none")), "no needle results folder")]:
        with pytest.raises(SystemExit):
            run_needle.main(["--context_lengths", "120", "--save_dir", str(tmp_path / "out"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
    assert run_needle.main(["--model_path", "random:tiny-llama", "--haystack", "noise", "--context_lengths", "130",
                            "--depths", "0,100", "--save_dir", str(tmp_path / "out"), "--max_new_tokens", "2",
                            "--no_plot"]) == 0
    cell = tmp_path / "out" / "random-tiny-llama_fullkv" / needle_scoring.cell_filename(130, 100)
    assert json.loads(cell.read_text())["haystack"] == "noise"


# ----------------------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_finds_the_needle_in_a_short_essay_haystack(tmp_path: Path) -> None:
    from kvfactory import models

    try:
        model, tokenizer = models.load("smollm2-135m")
    except (OSError, ImportError, ValueError) as error:
        pytest.skip(f"the embedded SmolLM2 cannot be loaded here ({error})")
    import kvfactory

    folder = needle_haystack.default_haystack_dir() or essays(tmp_path)
    haystack = needle.haystack_ids(tokenizer, "essays", folder, min_tokens=400)
    run = needle.NeedleRun(results_dir=tmp_path / "smol", lengths=[400], depths=[50], model="smollm2-135m",
                           method="fullkv", budget=None, version="smol", max_new_tokens=40)
    with kvfactory.patch(model, "fullkv") as handle:
        from kvfactory.benchmarks.common import model_stop_token_ids

        needle.run_needle(model, tokenizer, handle, run, haystack,
                          stop_token_ids=model_stop_token_ids(model, tokenizer))
    (cell,) = needle_scoring.read_cells(run.results_dir)
    assert cell["input_tokens"] == 400 and cell["kept_tokens"] == 400
    if needle_haystack.default_haystack_dir() is not None:
        assert cell["recall"] >= 0.5, cell["answer"]
