"""The ``emdask`` command is installed with the library, its dependencies with the
``pipelines`` extra: without them it says what to install, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The command, run in a fresh interpreter in which importing BLOCKED fails as it does where
# the package is not installed; afterwards, which of the heavy modules were imported.
WRAPPER = textwrap.dedent("""
    import sys

    BLOCKED = sys.argv[1]

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == BLOCKED or name.startswith(BLOCKED + "."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    from pipelines.cli import main

    try:
        status = main(sys.argv[2:])
    except SystemExit as exc:  # --help
        status = exc.code
    loaded = [m for m in ("prefect", "distributed", "emdask", "matplotlib") if m in sys.modules]
    print("loaded:", ",".join(loaded))
    sys.exit(status)
""")


def _run(blocked, *argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", WRAPPER, blocked, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("blocked, package", [("matplotlib", "matplotlib"), ("prefect", "prefect"),
                                              ("PIL", "pillow")])
def test_a_missing_dependency_stops_the_command_before_any_work(tmp_path, blocked, package):
    source = tmp_path / "survey.csv"
    source.write_text("id,a,b\n1,1.0,\n2,,3.0\n3,2.0,1.0\n")
    done = _run(blocked, "impute", str(source), str(tmp_path / "out"), "--id", "id",
                         cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip()
    assert message.count("\n") == 0, message
    assert package in message and 'pip install "emdask[pipelines]"' in message
    # nothing started: neither Prefect nor Dask nor the library was imported, nothing written
    assert done.stdout.strip() == "loaded:"
    assert not (tmp_path / "out").exists()


def test_help_works_without_the_dependencies(tmp_path):
    done = _run("prefect", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'pip install "emdask[pipelines]"' in " ".join(done.stdout.split())
    done = _run("matplotlib", "impute", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--id" in done.stdout
