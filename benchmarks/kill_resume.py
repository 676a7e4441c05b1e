"""Kill -9 and concurrency check of the LongBench, RULER and needle runners (issue 19).

For each runner, on a tiny random-weight Llama with a character tokenizer (built here, no download) and synthetic
data:

1. an uninterrupted reference run;
2. ``--kills`` trials, each in a fresh folder: a run ``kill -9``-ed at a uniformly random time between half the
   reference's time to its first record (the model is loading) and the time of its last record, then a resume that
   finishes;
3. (``--concurrent``) two runs started together into one fresh folder, both left to finish.

It then checks that every killed-and-resumed folder and the concurrent folder hold every record exactly once (0 lost,
0 duplicated) and that every prediction equals the reference's (lost/duplicated/changed are summed over trials;
``killed_with_records`` is how many records each killed run had written). Runs are forked from this process (imports paid
once), each child on one thread, so a run takes about a second.

    python -m benchmarks.kill_resume --kills 20            # the issue's check: 20 kills per runner
    python -m benchmarks.kill_resume --kills 3 --runners needle --seed 1

Exit status 0 when every check holds. ``tests/test_kill_resume.py`` runs it with fewer kills.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RUNNERS = ("longbench", "ruler", "needle")
SAMPLES = 6
PROMPTS = {"multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nQuestion: {input}\nAnswer:"}


# ---------------------------------------------------------------------------------------------------- workspace
def tiny_checkpoint(folder: Path, config: Any = "tiny-llama") -> Path:
    """A random two-layer Llama (or ``config``: a name or config for ``random_model``) with a one-character-per-token
    tokenizer and a chat template, saved to ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from kvfactory.models import random_model

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(string.printable) - set("\x0b\x0c")))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="</s>", additional_special_tokens=specials[3:],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    model = random_model(config, seed=0)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def longbench_data(folder: Path, samples: int = SAMPLES) -> Path:
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "dataset2prompt.json").write_text(json.dumps(PROMPTS))
    (folder / "config" / "dataset2maxlen.json").write_text(json.dumps({name: 24 for name in PROMPTS}))
    with open(folder / "multifieldqa_en.jsonl", "w") as handle:
        for i in range(samples):
            record = {"input": f"question {i}?", "context": f"Passage {i}: " + "some words here. " * (3 + i),
                      "answers": [f"answer {i}"], "length": 100 + i, "dataset": "multifieldqa_en", "language": "en",
                      "all_classes": None, "_id": f"multifieldqa_en-{i}"}
            handle.write(json.dumps(record) + "\n")
    return folder


def ruler_data(folder: Path, samples: int = SAMPLES) -> Path:
    path = folder / "256" / "niah_single_1.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w") as handle:
        for i in range(samples):
            key = 1000 + 37 * i
            text = f"Some text. The special magic number for key-{i} is: {key}. More text. " * 2
            record = {"index": i, "input": text + f"What is the special magic number for key-{i}? Answer:",
                      "outputs": [str(key)], "length": len(text)}
            handle.write(json.dumps(record) + "\n")
    return folder


def runner_argv(runner: str, workspace: Path, save_dir: Path) -> list[str]:
    model = ["--model_path", str(workspace / "model"), "--method", "snapkv", "--max_capacity_prompts", "24",
             "--window_size", "4"]
    if runner == "longbench":
        return [*model, "--data_dir", str(workspace / "longbench"), "--save_dir", str(save_dir), "--max_length", "200",
                "--datasets", "multifieldqa_en"]
    if runner == "ruler":
        return [*model, "--data_dir", str(workspace / "ruler"), "--save_dir", str(save_dir), "--tasks",
                "niah_single_1", "--context_lengths", "256", "--max_new_tokens", "24"]
    if runner == "needle":
        return [*model, "--haystack", "noise", "--needle", "The code is 4213.", "--retrieval_question",
                "What is the code?", "--context_lengths", "300,360", "--depths", "0,25,50,75",
                "--max_new_tokens", "24", "--no_plot", "--save_dir", str(save_dir)]
    raise ValueError(f"unknown runner {runner!r}; accepted: {', '.join(RUNNERS)}")


def runner_main(runner: str) -> Callable[[list[str]], int]:
    if runner == "longbench":
        import run_longbench

        return run_longbench.main
    if runner == "ruler":
        import run_ruler

        return run_ruler.main
    import run_needle

    return run_needle.main


def read_results(runner: str, save_dir: Path) -> list[tuple[Any, str]]:
    """Every (key, prediction) the folder holds, in file order (a key twice means a duplicate)."""
    if runner == "needle":
        from kvfactory.benchmarks.needle_scoring import read_cells

        folders = [path for path in save_dir.iterdir() if path.is_dir()] if save_dir.is_dir() else []
        return [(f"{c['context_length']}@{c['depth_percent']:g}", c["answer"])
                for folder in folders for c in read_cells(folder)]
    pattern = "*/*/snapkv.jsonl" if runner == "longbench" else "*/*/*/snapkv.jsonl"
    found = []
    for path in sorted(save_dir.glob(pattern)):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)  # the runners' own repair must leave only valid lines behind
            found.append((record.get("_id", record.get("index")), record["pred"]))
    return found


# ------------------------------------------------------------------------------------------------------- forking
def spawn(runner: str, argv: list[str], log: Path) -> int:
    """Fork a child that runs ``runner``'s CLI with ``argv`` on one thread (output to ``log``); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        import torch

        torch.set_num_threads(1)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = runner_main(runner)(argv) or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child reports and exits, never returns into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_to_end(runner: str, argv: list[str], log: Path, save_dir: Path | None = None) -> tuple[float, float, float]:
    """Run to the end; returns (seconds, seconds until the first and until the last record appeared under
    ``save_dir``; both equal to the run's seconds when ``save_dir`` is None)."""
    started, first, last, count = time.perf_counter(), None, None, 0
    pid = spawn(runner, argv, log)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if save_dir is not None:
            now = len(_safe_read(runner, save_dir))
            if now > count:
                count, last = now, time.perf_counter() - started
                first = last if first is None else first
        time.sleep(0.01)
    if code != 0:
        raise RuntimeError(f"{runner} exited {code}; see {log}:\n{log.read_text()[-3000:]}")
    seconds = time.perf_counter() - started
    return seconds, seconds if first is None else first, seconds if last is None else last


@dataclass
class Report:
    runner: str
    reference_seconds: float
    records: int
    kills: int = 0
    killed_with_records: list[int] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    changed: int = 0
    concurrent_lost: int | None = None
    concurrent_duplicated: int | None = None
    concurrent_changed: int | None = None

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.changed or self.concurrent_lost
                    or self.concurrent_duplicated or self.concurrent_changed)


def compare(reference: list[tuple[Any, str]], found: list[tuple[Any, str]]) -> tuple[int, int, int]:
    """(lost, duplicated, changed) of ``found`` against the reference predictions."""
    truth = dict(reference)
    keys = [key for key, _ in found]
    got = dict(found)
    lost = len(set(truth) - set(got))
    duplicated = len(keys) - len(set(keys))
    changed = sum(1 for key, pred in got.items() if key in truth and truth[key] != pred)
    return lost, duplicated, changed


def check_runner(runner: str, workspace: Path, kills: int, rng: random.Random, concurrent: bool) -> Report:
    out = workspace / "runs" / runner
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    seconds, first, last = run_to_end(runner, runner_argv(runner, workspace, out / "reference"), log,
                                      out / "reference")
    reference = read_results(runner, out / "reference")
    if len(reference) != len({key for key, _ in reference}):
        raise RuntimeError(f"{runner}: the reference run itself holds duplicates")
    report = Report(runner, round(seconds, 2), len(reference))

    for trial in range(kills):  # each trial: a fresh folder, one kill -9 at a random point, one resume
        killed = out / f"killed{trial}"
        pid = spawn(runner, runner_argv(runner, workspace, killed), log)
        time.sleep(rng.uniform(first / 2, last))  # from model loading to the last write
        os.kill(pid, signal.SIGKILL)
        wait(pid)
        report.kills += 1
        report.killed_with_records.append(len(_safe_read(runner, killed)))
        run_to_end(runner, runner_argv(runner, workspace, killed), log)
        lost, duplicated, changed = compare(reference, read_results(runner, killed))
        report.lost, report.duplicated, report.changed = (report.lost + lost, report.duplicated + duplicated,
                                                          report.changed + changed)
        shutil.rmtree(killed)

    if concurrent:
        shared = out / "concurrent"
        pids = [spawn(runner, runner_argv(runner, workspace, shared), log) for _ in range(2)]
        codes = [wait(pid) for pid in pids]
        if any(codes):
            raise RuntimeError(f"{runner}: a concurrent run exited {codes}; see {log}")
        found = read_results(runner, shared)
        report.concurrent_lost, report.concurrent_duplicated, report.concurrent_changed = compare(reference, found)
    return report


def _safe_read(runner: str, save_dir: Path) -> list[Any]:
    """Records at a kill (a truncated last line is not counted; the next run repairs it)."""
    try:
        return read_results(runner, save_dir)
    except (json.JSONDecodeError, FileNotFoundError):
        return []


def prepare(workspace: Path) -> Path:
    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / "model" / "config.json").is_file():
        tiny_checkpoint(workspace / "model")
    if not (workspace / "longbench").is_dir():
        longbench_data(workspace / "longbench")
    if not (workspace / "ruler").is_dir():
        ruler_data(workspace / "ruler")
    return workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill -9 runs per runner (default 20, the issue's)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma list of {', '.join(RUNNERS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--no_concurrent", action="store_true", help="skip the two-runs-into-one-folder check")
    args = parser.parse_args(argv)
    runners = [name.strip() for name in args.runners.split(",") if name.strip()]
    unknown = [name for name in runners if name not in RUNNERS]
    if unknown or args.kills < 0:
        parser.error(f"--runners takes {', '.join(RUNNERS)} (got {', '.join(unknown)}); --kills >= 0")
    import tempfile

    workspace = prepare(args.workdir or Path(tempfile.mkdtemp(prefix="kvf_kill_")))
    for runner in runners:  # imported once here, so the forked children start warm
        runner_main(runner)
    if "ruler" in runners:
        from kvfactory.benchmarks.ruler.essays import sentence_splitter_source

        sentence_splitter_source()  # loads Punkt once (cached), not in every child
    from kvfactory.benchmarks.common import git_commit

    git_commit()  # cached likewise
    rng = random.Random(args.seed)
    reports = [check_runner(runner, workspace, args.kills, rng, not args.no_concurrent) for runner in runners]
    for report in reports:
        print(json.dumps(report.__dict__ | {"ok": report.ok}))
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
