"""Scheduled deployments: the shipped deploy/prefect.yaml, and a real served run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest

import emdask
from pipelines import serve
from pipeline_data import survey_frame, write_dataset, published_dir

REPO = Path(__file__).resolve().parents[2]


def test_shipped_deployments_have_schedules_and_a_process_pool():
    import yaml

    specs = serve.load_config(REPO / "deploy" / "prefect.yaml")
    assert {s.entrypoint for s in specs} == set(serve.FLOWS)
    for spec in specs:
        assert spec.schedules and all(len(cron.split()) == 5 for cron, _ in spec.schedules)
        spec.flow().validate_parameters(spec.parameters)  # Prefect accepts them
    document = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    assert {d["work_pool"]["name"] for d in document["deployments"]} == {"emdask-process"}
    deployments = serve.to_deployments(specs)
    assert sorted(d.name for d in deployments) == sorted(s.name for s in specs)
    assert all(d.schedules for d in deployments)


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: os.py:system\n")
    with pytest.raises(serve.ConfigError, match="entrypoint 'os.py:system' is not one of"):
        serve.load_config(bad)
    bad.write_text(
        "deployments:\n  - name: x\n    entrypoint: pipelines/impute.py:impute_survey\n"
        "    parameters: {source: '{{ $EMDASK_TEST_UNSET_VARIABLE }}'}\n"
    )
    with pytest.raises(serve.ConfigError, match="EMDASK_TEST_UNSET_VARIABLE is not set"):
        serve.load_config(bad)


def _wait_for_deployment(name, proc, timeout=120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"emdask serve exited: {proc.stdout.read()[-3000:]}")
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(0.5)
    raise AssertionError(f"deployment {name} was not registered in {timeout} s")


def test_served_deployment_runs_when_triggered(api, dask_address, tmp_path):
    from prefect.deployments import run_deployment

    src = write_dataset(survey_frame(300), tmp_path / "survey", npartitions=2)
    dest = tmp_path / "imputed"
    config = tmp_path / "prefect.yaml"
    config.write_text(f"""
deployments:
  - name: nightly-test
    entrypoint: pipelines/impute.py:impute_survey
    schedules:
      - cron: "0 2 * * *"
        timezone: UTC
    parameters:
      source: "{{{{ $EMDASK_TEST_SURVEY }}}}"
      dest: {dest}
      id_column: rid
      n_components: 2
""")
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DASK_SCHEDULER_ADDRESS": dask_address,  # the flow's default cluster
        "EMDASK_TEST_SURVEY": src,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(config)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deployment = _wait_for_deployment("impute-survey/nightly-test", proc)
        assert deployment.schedules[0].schedule.cron == "0 2 * * *"
        assert deployment.parameters["source"] == src
        run = run_deployment("impute-survey/nightly-test", timeout=240, poll_interval=1)
        assert run.state.is_completed(), run.state
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = pd.read_parquet(published_dir(dest) / "data")
    table = dd.read_parquet(src)
    expected = emdask.EMImputer(2, random_state=0).fit(table, columns=["x", "y", "z"]).transform(table)
    pd.testing.assert_frame_equal(out.reset_index(drop=True), expected.compute().reset_index(drop=True),
                                  check_exact=False, rtol=1e-10)
