"""The ``emdask`` command: help, one-line errors, and real runs recorded by Prefect."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import errors
from pipelines.cli import build_parser, main
from pipeline_data import customers_frame, image_array, survey_frame, write_dataset, published_dir

REPO = Path(__file__).resolve().parents[2]


def _command():
    script = shutil.which("emdask", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "pipelines.cli"]


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", ["impute", "segment", "segment-image", "coin", "demo", "serve"])
def test_help_documents_every_option(name, capsys):
    parser = _subcommands()[name]
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text, f"{name} --help does not show {flag}"


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in _subcommands():
        assert name in text


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = write_dataset(survey_frame(40), tmp_path / "survey", npartitions=2)
    (tmp_path / "text.png").write_text("hello")
    out = tmp_path / "out"
    cases = [
        (["impute", str(tmp_path / "missing"), str(out), "--id", "rid"], "does not exist"),
        (["impute", src, str(out), "--id", "nope"], "id column 'nope' is not in the table"),
        (["impute", src, str(out), "--id", "rid", "--columns", "x,w"], "not in the table"),
        (["segment", src, src, "--id", "rid"], "overlaps"),
        (["segment-image", str(tmp_path / "text.png"), str(out)], "is not an image"),
    ]
    for argv, message in cases:
        status = main(argv)
        err = capsys.readouterr().err.strip()
        assert status == 2, argv
        assert len(err.splitlines()) == 1 and err.startswith(f"emdask {argv[0]}: error: ")
        assert message in err
        assert not out.exists()


def test_bad_option_values_are_refused_by_the_parser(capsys):
    for argv in (["segment", "a", "b", "--id", "i", "--k-range", "5:2"],
                 ["segment-image", "a", "b", "-k", "0"],
                 ["impute", "a", "b"]):  # --id is required
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "error" in capsys.readouterr().err


def test_impute_and_segment_commands(api, dask_address, tmp_path, capsys):
    survey = write_dataset(survey_frame(300, categorical=True), tmp_path / "survey", npartitions=2)
    status = main(["impute", survey, str(tmp_path / "imputed"), "--id", "rid", "-k", "2",
                   "--columns", "x,y,colour", "--dask-address", dask_address])
    text = capsys.readouterr().out
    assert status == 0, text
    version = published_dir(tmp_path / "imputed")
    assert f"impute-survey: published {version}" in text
    assert "MixedMixture k=2" in text and str(version / "model") in text
    out = pd.read_parquet(version / "data")
    assert not out[["x", "y", "colour"]].isna().any().any()
    assert out["z"].isna().any()  # not among --columns: left as it was

    customers = write_dataset(customers_frame(600), tmp_path / "customers", npartitions=2)
    status = main(["segment", customers, str(tmp_path / "segments"), "--id", "cid",
                   "--k-range", "2:4", "--scale", "--dask-address", dask_address])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "k=3 chosen by BIC among 2..4" in text
    assert "bic.png" in text and "profile.parquet" in text


def test_coin_command(api, capsys):
    assert main(["coin"]) == 0
    text = capsys.readouterr().out
    assert "theta_A" in text and "theta_B" in text
    assert "0.6000" in text or "0.5999" in text  # the one-coin estimate reaches 6/10


def test_segment_image_command_in_a_process_of_its_own(api, tmp_path):
    png = tmp_path / "picture.png"
    Image.fromarray(image_array(64, 48)).save(png)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)  # the run starts (and closes) a local cluster
    done = subprocess.run(
        [*_command(), "segment-image", str(png), str(tmp_path / "out"), "-k", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    version = published_dir(tmp_path / "out")
    assert f"segment-image: published {version}" in done.stdout
    assert "EM iter    1" in done.stdout + done.stderr  # progress per iteration
    labels = np.load(version / "labels.npy")
    assert labels.shape == (48, 64) and set(np.unique(labels)) == {0, 1, 2}

    bad = subprocess.run(
        [*_command(), "impute", str(tmp_path / "nothing"), str(tmp_path / "x"), "--id", "id"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
