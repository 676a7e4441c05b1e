"""The predecessors' table commands: kvpress's compression_ratio budget in the grid, kvcompress's method presets,
its streaming quality measure on a tiny model, and its four figures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvfactory import methods
from kvfactory.benchmarks import grid
from kvfactory.benchmarks.kvcompress_table import METHODS, method_spec, plot_table, pyramid_budgets, stream_quality
from kvfactory.models import random_model


def test_grid_compression_ratio_is_the_share_removed() -> None:
    assert grid.budget_params(0.3, "compression_ratio", "knorm") == {"compression_ratio": 0.3}
    assert grid.budget_params(0.3, "compression_ratio", "lagkv") == {"compression_ratio": 0.3}
    assert grid.budget_params(0.3, "compression_ratio", "snapkv") == {"max_capacity_prompt_ratio": 0.7}
    specs = grid.grid_specs(["knorm", "streamingllm"], [0.1, 0.7], "compression_ratio")
    assert [s.label for s, _ in specs] == ["fullkv", "knorm@0.1", "knorm@0.7", "streamingllm@0.1", "streamingllm@0.7"]
    assert specs[4][0].params == {"max_capacity_prompt_ratio": 0.3}
    with pytest.raises(ValueError, match="share removed"):
        grid.budget_params(1.0, "compression_ratio", "knorm")


def test_kvcompress_presets_build_and_match_its_layouts() -> None:
    for name in METHODS:
        spec = method_spec(name, 512, 30)
        methods.get(spec.method, **spec.params)
    h2o_l2 = methods.get("h2o_l2", **method_spec("h2o_l2", 512, 30).params)
    assert (h2o_l2.sink_size, 512 - h2o_l2.sink_size - h2o_l2.window_size, h2o_l2.window_size) == (4, 64, 444)
    assert pyramid_budgets(512, 0.5, 4) == [512, 256, 128, 64]
    assert pyramid_budgets(16, 0.1, 3) == [16, 8, 8]  # floored


def test_stream_quality_bounds_the_cache_on_a_tiny_model() -> None:
    model = random_model("tiny-llama", seed=0)
    tokens = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    full = stream_quality(model, tokens, method_spec("baseline", 0, 2), chunk=32)
    recent = stream_quality(model, tokens, method_spec("recent_only", 40, 2), chunk=32)
    assert full["kv_tokens"] == 200 and recent["kv_tokens"] <= 40 + 32
    assert full["scored_tokens"] == recent["scored_tokens"] == 199
    with torch.no_grad():  # the baseline's PPL is the unpatched model's
        logits = model(torch.tensor([tokens])).logits[0, :-1]
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])).exp().item()
    assert full["ppl"] == pytest.approx(reference, rel=1e-4)


def test_kvcompress_figures(tmp_path: Path) -> None:
    rows = [{"label": "baseline", "method": "baseline", "cache_size": None, "ppl": 10.0, "next_token_acc": 0.5,
             "kv_tokens": 2000.0, "ttft_seconds": 0.02, "tpot_seconds": 0.01, "throughput_tokens_per_second": 80.0}]
    for size in (512, 1024):
        for i, name in enumerate(("recent_only", "streaming_llm")):
            rows.append({"label": f"{name}@{size}", "method": name, "cache_size": size, "ppl": 12.0 + i + size / 1e3,
                         "next_token_acc": 0.4, "kv_tokens": float(size), "ttft_seconds": 0.01,
                         "tpot_seconds": 0.009, "throughput_tokens_per_second": 90.0})
    paths = plot_table(rows, tmp_path, "test")
    assert [p.name for p in paths] == ["kvcompress_methods.png", "kvcompress_tradeoff.png", "kvcompress_heatmap.png",
                                       "kvcompress_cache_efficiency.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_kvcompress_command_line_lives_outside_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.kvcompress_table`` (the command of scripts/predecessors/kvcompress.sh) writes the rows,
    the four figures and prints the table; the library module has no command line (and no print)."""
    import benchmarks.kvcompress_table as cli
    import kvfactory.benchmarks.kvcompress_table as library

    assert not hasattr(library, "main")
    script = (Path(__file__).resolve().parent.parent / "scripts" / "predecessors" / "kvcompress.sh").read_text()
    assert "python -m benchmarks.kvcompress_table" in script
    tokens = torch.randint(3, 128, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(cli, "load_model", lambda args: (random_model("tiny-llama", seed=0), None))
    monkeypatch.setattr(cli.ppl, "load_documents", lambda dataset, data_dir: ["unused"])
    monkeypatch.setattr(cli.ppl, "token_stream", lambda tokenizer, documents: tokens)
    assert cli.main(["--model_path", "random:tiny-llama", "--sizes", "24", "--methods", "recent_only",
                     "--chunk", "16", "--no_speed", "--output_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("label | ppl") and printed[1].startswith("baseline |")
    assert printed[2].startswith("recent_only@24 |") and "| 24 |" in printed[2]
    assert len(list((tmp_path / "kvcompress").glob("*.png"))) == 4


def test_the_library_never_prints() -> None:
    """``logging``, not ``print``, in ``kvfactory/``: command lines live in ``benchmarks/`` and ``run_*.py``. The one
    exception is ``kvfactory/__main__.py``, the ``python -m kvfactory`` / ``kvfactory`` program, whose output is the
    table it prints."""
    import ast

    library = Path(__file__).resolve().parent.parent / "kvfactory"
    printing = []
    for path in sorted(library.rglob("*.py")):
        if path.name == "__main__.py" and path.parent == library:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        printing += [f"{path.relative_to(library)}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert printing == []
