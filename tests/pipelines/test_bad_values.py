"""Values no model can take (a column all missing, an infinite cell, values whose squares
overflow, more components than rows) and damaged Parquet files: 'emdask impute' and
'emdask segment', run as processes, exit with status 2 and one line naming the column, the
parameter or the file, in the first pass (before any fit) or before any service, without
retrying, and leave the destination as it was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_data import survey_frame, tree_digest, write_dataset

REPO = Path(__file__).resolve().parents[2]


def _command():
    return [sys.executable, "-m", "pipelines.cli"]


def _env(api):
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])])}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def _published_destination(root):
    """A destination holding one published version (as a previous run leaves it)."""
    from pipelines.versions import open_destination

    dest = open_destination(str(root))
    with dest.new_version("e" * 64) as version:
        (version.local / "data.txt").write_text("the previous version\n")
        version.commit({"run_key": "e" * 64})
    return str(root)


def _bad_tables(root):
    base = survey_frame(60)
    all_missing = base.assign(x=np.nan)
    infinite = base.copy()
    infinite.loc[7, "y"] = np.inf
    huge = base.assign(z=base["z"] * 1e300)  # finite, but squares overflow
    return {
        "all-missing": (write_dataset(all_missing, root / "all-missing", 2), [],
                        "column(s) ['x'] have no observed value (all 60 cells missing)"),
        "infinite": (write_dataset(infinite, root / "infinite", 2), [],
                     "column 'y' holds 1 infinite value(s)"),
        "huge": (write_dataset(huge, root / "huge", 2), [],
                 "column(s) ['z'] hold values too large to model"),
        "few-rows": (write_dataset(base.iloc[:3], root / "few-rows", 2), ["-k", "5"],
                     "n_components (-k)=5 is more than the 3 row(s) with an observed value"),
    }


def _start(command, source, dest, extra, api, dask_address):
    argv = [*_command(), command, source, dest, "--id", "rid", "--dask-address", dask_address,
            *(extra or (["-k", "2"] if command == "segment" else []))]
    return subprocess.Popen(argv, cwd=REPO, env=_env(api), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_values_no_model_takes_are_refused_in_the_first_pass(prefect_api, dask_address, tmp_path):
    """Every case through both commands, the eight processes side by side."""
    runs = []
    for case, (source, extra, message) in _bad_tables(tmp_path / "sources").items():
        for command in ("impute", "segment"):
            dest = _published_destination(tmp_path / case / command)
            runs.append((case, command, dest, message, tree_digest(dest),
                         _start(command, source, dest, extra, prefect_api, dask_address)))
    for case, command, dest, message, before, proc in runs:
        out, err = proc.communicate(timeout=300)
        logs = out + err
        assert proc.returncode == 2, (case, command, logs[-3000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"emdask {command}: error: {message}"), (case, last)
        assert "Traceback" not in logs, (case, command, logs[-3000:])
        # the first pass ran once and failed: no retry, no fit
        failed = re.findall(r"Task run 'profile_source-\w+' - Finished in state Failed", logs)
        assert len(failed) == 1, (case, command, logs)
        assert "Retry" not in logs and "fitting" not in logs.replace("before fitting", ""), logs
        assert tree_digest(dest) == before, (case, command)


def _corrupt_sources(root):
    """Parquet datasets with one damaged file each (part.1.parquet)."""
    good = survey_frame(200)
    out = {}
    for name in ("cut-in-half", "random-bytes", "bad-data-page"):
        path = Path(write_dataset(good, root / name, 2))
        part = path / "part.1.parquet"
        data = part.read_bytes()
        if name == "cut-in-half":
            part.write_bytes(data[: len(data) // 2])
        elif name == "random-bytes":
            part.write_bytes(np.random.default_rng(0).bytes(len(data)))
        else:
            part.write_bytes(_corrupt_first_data_page(part))
        out[name] = str(path)
    return out


def _corrupt_first_data_page(path):
    """The file's bytes with the values of its first column chunk's data page overwritten;
    the footer (schema, row counts, offsets) is left whole."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(0).column(1)  # 'x'
    start = column.data_page_offset
    size = column.total_compressed_size
    data = bytearray(path.read_bytes())
    # keep the page header (its first bytes); garble the page's body
    for i in range(start + 24, start + size):
        data[i] = 0xFF
    return bytes(data)


def test_damaged_parquet_files_are_named(prefect_api, dask_address, tmp_path):
    """A file cut in half and one of random bytes are refused from their footers before any
    service starts; a file whose footer is whole but whose data page is damaged is refused in
    the first pass, not retried. Each error names the file; the destination stays as it was."""
    sources = _corrupt_sources(tmp_path / "sources")
    runs = []
    for case, source in sources.items():
        for command in ("impute", "segment"):
            dest = _published_destination(tmp_path / case / command)
            if case == "bad-data-page":
                proc = _start(command, source, dest, ["-k", "2"], prefect_api, dask_address)
            else:  # no Prefect API and no scheduler: one would start only after the checks
                env = {k: v for k, v in _env(prefect_api).items() if k != "PREFECT_API_URL"}
                proc = subprocess.Popen([*_command(), command, source, dest, "--id", "rid"],
                                        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
            runs.append((case, command, source, dest, tree_digest(dest), proc))
    for case, command, source, dest, before, proc in runs:
        out, err = proc.communicate(timeout=300)
        logs = out + err
        assert proc.returncode == 2, (case, command, logs[-3000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"emdask {command}: error: source {source}: part.1.parquet "), last
        assert "Traceback" not in logs, (case, command, logs[-3000:])
        if case == "bad-data-page":
            assert "part.1.parquet is damaged: its data cannot be decoded" in last, last
            failed = re.findall(r"Task run 'profile_source-\w+' - Finished in state Failed", logs)
            assert len(failed) == 1 and "Retry" not in logs, (case, command, logs)
            assert "fitting" not in logs, logs
        else:
            assert "is not a readable Parquet file" in last, last
            assert err.strip().count("\n") == 0, err  # no Prefect API, no flow run: one line
        assert tree_digest(dest) == before, (case, command)
