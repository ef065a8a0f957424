"""Packaging: the repository root installs as the package ``covedit`` (pyproject.toml's package-dir), so the
wheel holds ``covedit/`` and its dist-info and nothing else (no top-level ``cli``, ``pipeline`` or ``stats``
to clash with other distributions, no tests, benchmarks, scripts or examples), with the data files of
``covedit.pipeline`` and ``covedit.stats`` and the console script ``covedit = covedit.cli:main``. And
``python cli.py`` still runs from a checkout where covedit is not installed."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Left out of the copy that is built: version control, environments, outputs and earlier builds (a stale
# build/lib would go into the wheel as it is).
TOP_SKIP = {".git", ".venv", "out", "build", ".whl", ".pytest_cache"}


def skip_generated(folder: str, names: list[str]) -> list[str]:
    top = Path(folder) == ROOT
    return [n for n in names if (top and n in TOP_SKIP) or n == "__pycache__" or n.endswith(".egg-info")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    """A wheel built offline from a copy of the checkout, with this environment's setuptools (the test extra)."""
    src = tmp_path_factory.mktemp("src") / "covedit"
    shutil.copytree(ROOT, src, ignore=skip_generated)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("covedit-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


@pytest.mark.slow
def test_wheel_holds_only_the_covedit_package(wheel):
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert "covedit" in top and all(t == "covedit" or re.fullmatch(r"covedit-[^/]+\.dist-info", t) for t in top), top
    expected = {"covedit/__init__.py", "covedit/cli.py"}
    for pkg in ("pipeline", "stats"):
        expected |= {f"covedit/{pkg}/{p.name}" for p in (ROOT / pkg).glob("*.py")}
        expected |= {f"covedit/{pkg}/data/{p.name}" for p in (ROOT / pkg / "data").glob("*") if p.is_file()}
    assert {n for n in names if n.startswith("covedit/")} == expected
    assert "covedit/pipeline/data/unrelated_prompts.txt" in expected  # the data files are really there


@pytest.mark.slow
def test_wheel_console_script_is_covedit_cli_main(wheel):
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(name).decode())
    assert dict(entry_points["console_scripts"]) == {"covedit": "covedit.cli:main"}


# Runs cli.py as ``python cli.py`` does, with ``covedit`` made unimportable (as where it is not installed).
NOT_INSTALLED = """
import runpy, sys

class NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "covedit":
            raise ModuleNotFoundError("No module named 'covedit'", name=name)

sys.meta_path.insert(0, NotInstalled)
sys.argv = [sys.argv[1], "stats", "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("covedit from", sys.modules["covedit"].__file__)
print("top-level", sorted(m for m in sys.modules if m.split(".")[0] in ("cli", "pipeline", "stats")))
"""


@pytest.mark.slow
def test_python_cli_py_runs_from_a_checkout_without_an_install(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NOT_INSTALLED, str(ROOT / "cli.py")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Inspect, export and import statistics stores." in proc.stdout
    assert f"covedit from {ROOT / '__init__.py'}" in proc.stdout and "top-level []" in proc.stdout
