"""Data parallel runs (issue 18): ``torchrun --nproc_per_node 2`` of the LongBench, RULER and needle runners on CPU
(gloo) against a single-process run of the same command.

On the tiny random Llama with a character tokenizer of ``benchmarks/kill_resume.py`` (no download), for each runner:

1. a 1-process run (``python run_X.py ...``, one thread);
2. a 2-process run (``python -m torch.distributed.run --standalone --nproc_per_node 2 run_X.py ...``, or with
   ``--launcher accelerate`` ``accelerate launch --multi_gpu --num_processes 2 run_X.py ...``, one thread per process) into a fresh folder: it must hold the same records (ids and predictions), each once;
3. (``--kill RUNNERS``) a 2-process run where one rank is ``kill -9``-ed once it has written records (torchrun then stops the
   other), then a resume with 1 process: again the same records, none lost, none duplicated.

It prints one JSON line per runner, with ``ratio`` = 2-process wall time ÷ 1-process wall time (``seconds_2``,
``seconds_1``: process start, imports and model loading included, and those do not split) and ``answering_ratio``,
the same for the span from the first to the last record written (``answering_2``, ``answering_1``). ≈ 0.5–0.6 is
expected on 2 free cores with 1 thread per process, more on a loaded machine: time it under
``flock /tmp/kvf_cpu.lock``.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/kvf_cpu.lock python -m benchmarks.data_parallel --samples 40 \\
        --runners longbench,needle --hidden_size 512 --layers 8
    python -m benchmarks.data_parallel --samples 6 --kill longbench   # the check tests/test_data_parallel.py runs
    python -m benchmarks.data_parallel --samples 4 --runners needle --launcher accelerate   # and this one

Exit status 0 when every folder equals the 1-process one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.kill_resume import RUNNERS, longbench_data, read_results, ruler_data, runner_argv, tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"longbench": "run_longbench.py", "ruler": "run_ruler.py", "needle": "run_needle.py"}


def prepare(workspace: Path, samples: int, hidden_size: int = 64, layers: int = 2) -> Path:
    """The model (a random Llama of ``hidden_size`` and ``layers``, 4 query and 2 KV heads, character tokenizer) and
    the LongBench and RULER samples, under ``workspace``."""
    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / "model" / "config.json").is_file():
        from transformers import LlamaConfig

        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                             max_position_embeddings=512, initializer_range=0.2)
        tiny_checkpoint(workspace / "model", config)
    if not (workspace / "longbench").is_dir():
        longbench_data(workspace / "longbench", samples)
    if not (workspace / "ruler").is_dir():
        ruler_data(workspace / "ruler", samples)
    return workspace


LAUNCHERS = ("torchrun", "accelerate")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_command(launcher: str, processes: int) -> list[str]:
    """The command that starts ``processes`` workers: ``torchrun --standalone``, or ``accelerate launch --multi_gpu``
    (which, on a machine without GPUs, starts them on CPU with gloo; without ``--multi_gpu`` it would start one)."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    raise ValueError(f"unknown launcher {launcher!r}; accepted: {', '.join(LAUNCHERS)}")


def command(runner: str, workspace: Path, save_dir: Path, processes: int, samples: int,
            launcher: str = "torchrun") -> list[str]:
    argv = runner_argv(runner, workspace, save_dir)
    if runner == "needle":  # a grid of about `samples` cells
        depths = max(2, samples // 2)
        argv[argv.index("--depths") + 1] = ",".join(str(round(100 * i / (depths - 1))) for i in range(depths))
    script = [str(REPO / SCRIPTS[runner]), *argv]
    if processes == 1:
        return [sys.executable, *script]
    return [*launcher_command(launcher, processes), *script]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], log: Path, runner: str | None = None, save_dir: Path | None = None) -> tuple[float, float]:
    """Run ``cmd`` to the end; returns its wall time and the time from its first to its last new record under
    ``save_dir`` (the answering, without process start, imports and model loading; 0 without ``save_dir``)."""
    started = time.perf_counter()
    first = last = None
    count = len(_safe_read(runner, save_dir)) if save_dir is not None else 0
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(0.05)
            if save_dir is not None:
                now = len(_safe_read(runner, save_dir))
                if now > count:
                    count, last = now, time.perf_counter()
                    first = last if first is None else first
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {code}; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started, (last - first) if first is not None else 0.0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def run_and_kill_one_rank(cmd: list[str], runner: str, save_dir: Path, log: Path) -> int:
    """Start ``cmd`` (torchrun), ``kill -9`` one worker once the folder has a record; returns the records then."""
    with open(log, "ab") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT)
        found: list[Any] = []
        while launcher.poll() is None and not found:
            time.sleep(0.02)
            found = _safe_read(runner, save_dir)
        workers = _children(launcher.pid)
        if workers and launcher.poll() is None:
            os.kill(workers[-1], signal.SIGKILL)
        launcher.wait(timeout=300)
    return len(_safe_read(runner, save_dir))


def _safe_read(runner: str, save_dir: Path) -> list[Any]:
    try:
        return read_results(runner, save_dir)
    except (json.JSONDecodeError, FileNotFoundError, ValueError, KeyError):
        return []


def compare(reference: list[tuple[Any, str]], found: list[tuple[Any, str]]) -> dict[str, int]:
    """Lost, duplicated and changed records of ``found`` against ``reference``."""
    truth, got = dict(reference), dict(found)
    return {"lost": len(set(truth) - set(got)), "duplicated": len(found) - len(got),
            "changed": sum(1 for key, pred in got.items() if key in truth and truth[key] != pred)}


def check(runner: str, workspace: Path, samples: int, kill: bool, launcher: str = "torchrun") -> dict[str, Any]:
    out = workspace / "runs" / runner
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    seconds_1, answering_1 = run(command(runner, workspace, out / "one", 1, samples), log, runner, out / "one")
    reference = read_results(runner, out / "one")
    seconds_2, answering_2 = run(command(runner, workspace, out / "two", 2, samples, launcher), log, runner,
                                 out / "two")
    report: dict[str, Any] = {"runner": runner, "launcher": launcher, "records": len(reference),
                              "reference_duplicated": len(reference) - len(dict(reference)),
                              **compare(reference, read_results(runner, out / "two")),
                              "seconds_1": round(seconds_1, 2), "seconds_2": round(seconds_2, 2),
                              "ratio": round(seconds_2 / seconds_1, 3),
                              "answering_1": round(answering_1, 2), "answering_2": round(answering_2, 2),
                              "answering_ratio": round(answering_2 / answering_1, 3) if answering_1 else None}
    if kill:
        killed = out / "killed"
        report["killed_with_records"] = run_and_kill_one_rank(command(runner, workspace, killed, 2, samples, launcher),
                                                              runner, killed, log)
        run(command(runner, workspace, killed, 1, samples), log)
        report["resumed"] = compare(reference, read_results(runner, killed))
    return report


def ok(report: dict[str, Any]) -> bool:
    clean = report["records"] > 0 and not (report["reference_duplicated"] or report["lost"] or report["duplicated"]
                                           or report["changed"])
    return clean and not any((report.get("resumed") or {}).values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma list of {', '.join(RUNNERS)}")
    parser.add_argument("--samples", type=int, default=24, help="samples per runner (needle: about as many cells)")
    parser.add_argument("--kill", default="", help="comma list of runners whose 2-process run also gets one rank "
                        "killed, then a 1-process resume (e.g. longbench,ruler,needle)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                        help="what starts the 2-process runs: torchrun, or accelerate launch --multi_gpu")
    parser.add_argument("--hidden_size", type=int, default=64, help="of the random Llama (64: the tests' tiny one)")
    parser.add_argument("--layers", type=int, default=2, help="of the random Llama")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    runners = [name.strip() for name in args.runners.split(",") if name.strip()]
    unknown = [name for name in runners if name not in RUNNERS]
    if unknown or args.samples < 2:
        parser.error(f"--runners takes {', '.join(RUNNERS)} (got {', '.join(unknown)}); --samples >= 2")
    workspace = prepare(args.workdir or Path(tempfile.mkdtemp(prefix="kvf_dp_")), args.samples, args.hidden_size,
                        args.layers)
    killed = set(name.strip() for name in args.kill.split(",") if name.strip())
    if killed - set(runners):
        parser.error(f"--kill names runners not in --runners: {', '.join(sorted(killed - set(runners)))}")
    reports = [check(runner, workspace, args.samples, runner in killed, args.launcher) for runner in runners]
    for report in reports:
        print(json.dumps(report | {"ok": ok(report)}))
    load = os.getloadavg()[0]
    if any((report["answering_ratio"] or 1.0) > 0.7 for report in reports):
        print(f"note: 2-process ÷ 1-process answering time above the 0.5-0.6 expected on 2 free cores "
              f"({os.cpu_count()} CPUs here, load average {load:.1f}): other jobs share the cores")
    return 0 if all(ok(report) for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
