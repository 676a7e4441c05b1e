"""``pip install -e .`` works in a fresh virtual environment, and the console scripts run from any folder.

The venv sees this machine's packages (``--system-site-packages``, no pip of its own) and the install is offline
(``--no-deps --no-build-isolation``), so the check takes seconds and needs no network.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_editable_install_in_a_fresh_venv_gives_the_console_scripts(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-e", str(REPO)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    where = subprocess.run([str(python), "-c", "import kvfactory, run_longbench; print(kvfactory.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True)
    assert Path(where.stdout.strip()).parent == REPO / "kvfactory"
    shown = subprocess.run([str(venv / "bin" / "kvfactory-longbench"), "--help"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert shown.returncode == 0 and "--model_path" in shown.stdout, shown.stderr
    for script in ("kvfactory", "kvfactory-needle", "kvfactory-ruler", "kvfactory-ppl", "kvfactory-speed",
                   "kvfactory-passkey"):
        assert (venv / "bin" / script).is_file(), script
    assert not list(REPO.glob("*.egg-info")), "the install left build files in the checkout"
    # a benchmark script run by its path finds the installed kvfactory (no sys.path edit in the script)
    shown = subprocess.run([str(python), str(REPO / "benchmarks" / "kept_tokens.py"), "--help"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert shown.returncode == 0 and "--model_path" in shown.stdout, shown.stderr


def test_benchmarks_are_a_package_that_never_edits_sys_path() -> None:
    """Issue 19 case 13: every ``benchmarks/*.py`` runs as ``python -m benchmarks.X`` from the checkout (no
    install) and imports no module by editing ``sys.path``."""
    scripts = sorted(path for path in (REPO / "benchmarks").glob("*.py") if path.name != "__init__.py")
    assert (REPO / "benchmarks" / "__init__.py").is_file() and len(scripts) >= 9
    for path in scripts:
        assert "sys.path" not in path.read_text(encoding="utf-8"), path.name
    shown = subprocess.run([sys.executable, "-m", "benchmarks.kept_tokens", "--help"], capture_output=True, text=True,
                           cwd=REPO)
    assert shown.returncode == 0 and "--model_path" in shown.stdout, shown.stderr
    code = "; ".join(f"import benchmarks.{path.stem}" for path in scripts)
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": ""})
    assert imported.returncode == 0, imported.stderr
