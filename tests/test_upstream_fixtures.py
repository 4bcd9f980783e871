"""The one runner for every upstream golden case (see ../shared/fixtures/README.md for the format).

Runs each case directory (one holding meta.json) under tests/fixtures/upstream/, or, when VDJAX_FIXTURES is
set (directories joined by os.pathsep), the cases under those directories instead. A family that vdjax does
not implement yet is skipped with its name; a known family that fails is a failure.
"""
from __future__ import annotations

import importlib
import os
import pathlib

import pytest

from upstream_cases import case as case_lib

HERE = pathlib.Path(__file__).resolve().parent
# A family is known when tests/upstream_cases/<family>.py exists; it defines `run(case) -> {name: max abs error}`.
RUNNERS = {p.stem: f"upstream_cases.{p.stem}" for p in (HERE / "upstream_cases").glob("*.py")
           if p.stem not in ("__init__", "case")}


def _roots() -> list[pathlib.Path]:
    env = os.environ.get("VDJAX_FIXTURES")
    if env:
        return [pathlib.Path(p).resolve() for p in env.split(os.pathsep) if p]
    return [HERE / "fixtures" / "upstream"]


def _cases():
    found = []
    for root in _roots():
        if not root.is_dir():
            raise FileNotFoundError(f"VDJAX_FIXTURES names {root}, which is not a directory")
        for meta in sorted(root.rglob("meta.json")):
            # `weights_file(s)` paths are relative to the fixtures directory that holds the family folders.
            family_root = meta.parent.parent.parent
            found.append(pytest.param(meta.parent, family_root, id=str(meta.parent.relative_to(root))))
    return found


@pytest.mark.parametrize("path,root", _cases())
def test_upstream_case(path, root, record_property):
    case = case_lib.load(path, root)
    if case.family not in RUNNERS:
        pytest.skip(f"upstream family {case.family!r} is not implemented in vdjax yet")
    errors = importlib.import_module(RUNNERS[case.family]).run(case)
    for name, value in errors.items():
        record_property(f"max_abs_error_{name}", value)
    print(f"{case.family}/{path.name}: max abs errors {errors}")
