"""Benchmark scripts, run from a checkout (``python benchmarks/NAME.py``); not part of the installed package.

Each script puts the repository root on ``sys.path`` and imports this package first. The root is the package
``covedit`` (pyproject.toml's package-dir installs it under that name), so here it is registered as
``covedit``, as ``python cli.py`` does: the benchmarks run this checkout's code, installed or not.
"""

import importlib.util
import sys
from pathlib import Path

if "covedit" not in sys.modules:
    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("covedit", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["covedit"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["covedit"])
