"""The flows and the command take the EM algorithm (plain or SQUAREM) and pass it through."""

from __future__ import annotations

import json

import dask.dataframe as dd
import numpy as np
import pytest

import emdask
from pipelines.cli import build_parser
from pipelines.impute import impute_survey
from pipelines.impute import model_parameters as impute_parameters
from pipelines.segment import model_parameters as segment_parameters
from pipeline_data import published_dir, survey_frame, write_dataset


@pytest.mark.parametrize("command", ["impute", "segment"])
def test_the_command_takes_the_algorithm(command):
    parser = build_parser()
    base = [command, "src", "dst", "--id", "rid"]
    assert parser.parse_args(base).algorithm == "squarem"
    assert parser.parse_args(base + ["--algorithm", "em"]).algorithm == "em"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--algorithm", "fast"])


def test_the_algorithm_is_a_model_parameter():
    """It decides the run's output (and key), like every other model parameter."""
    assert impute_parameters(algorithm="squarem")["algorithm"] == "squarem"
    assert segment_parameters()["algorithm"] == "squarem"


def test_impute_flow_fits_with_the_algorithm_asked_for(api, dask_address, tmp_path):
    src = write_dataset(survey_frame(600), tmp_path / "survey", npartitions=3)
    dest = tmp_path / "imputed"
    impute_survey(src, str(dest), "rid", n_components=2, tol=1e-6, algorithm="em",
                  dask_address=dask_address)
    version = published_dir(dest)
    model = emdask.load(version / "model")
    assert model.algorithm == "em"
    reference = emdask.EMImputer(2, random_state=0, tol=1e-6, algorithm="em").fit(
        dd.read_parquet(src), columns=["x", "y", "z"]
    )
    np.testing.assert_allclose(model.means_, reference.means_, rtol=1e-10)
    assert model.n_iter_ == reference.n_iter_
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["parameters"]["algorithm"] == "em"
