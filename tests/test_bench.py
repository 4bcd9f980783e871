"""The bench/ scripts run end to end at their smoke size, so that they do not rot. Timings are printed, never
asserted. The scripts start at once (each is mostly imports and compiles) and must leave BENCHMARKS.md alone
with --no-append. Their module names must not shadow installed packages (a script's folder comes first on
sys.path: bench/kernels.py once hid the `kernels` package that transformers needs, and diffusers failed to import)."""
from __future__ import annotations

import importlib.machinery
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ("unet", "sample", "vae", "train_step", "blocks")


def test_no_bench_module_shadows_an_installed_package():
    def in_repository(folder):
        folder = pathlib.Path(folder or ".").resolve()
        return folder == ROOT or ROOT in folder.parents

    outside = [p for p in sys.path if not in_repository(p)]  # tests may have put launch/ on sys.path

    def installed(name):
        return name in sys.builtin_module_names or importlib.machinery.PathFinder.find_spec(name, outside) is not None

    shadowing = [p.name for p in sorted((ROOT / "bench").glob("*.py")) if installed(p.stem)]
    assert not shadowing, f"bench/{shadowing} hide installed packages of the same name from the scripts: rename them"


@pytest.fixture(scope="module")
def runs():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    procs = {name: subprocess.Popen([sys.executable, f"bench/{name}.py", "--size=smoke", "--no-append"], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in SCRIPTS}
    try:
        yield {name: (proc.communicate(timeout=600)[0], proc.returncode) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert (ROOT / "BENCHMARKS.md").read_text() == benchmarks, "--no-append changed BENCHMARKS.md"


@pytest.mark.slow  # ~80 s of subprocesses; VDJAX_SLOW=1 runs it
@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_runs_at_smoke_size(runs, name):
    out, code = runs[name]
    assert code == 0, out[-4000:]
    assert f"### {name}: " in out and "(smoke workload)" in out
    # Every vdjax row of the table has a median time and a vdjax/reference ratio.
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ")]
    ours = [row for row in rows if "vdjax" in row]
    assert ours, out[-4000:]
    for row in ours:
        i = row.index("vdjax")
        float(row[i + 1]), float(row[i + 3])
    assert "- machine: " in out and "- versions: jax " in out and "appended to" not in out
