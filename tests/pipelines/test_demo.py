"""The demo runs every flow on generated data, and commits two snapshots to a local Iceberg table."""

from __future__ import annotations

import pandas as pd

from pipelines.demo import run_demo


def test_demo_runs_every_flow_and_keeps_the_previous_iceberg_snapshot(api, tmp_path, monkeypatch):
    from pyiceberg.catalog import load_catalog

    for key in [k for k in list(__import__("os").environ) if k.startswith("PYICEBERG_CATALOG__DEMO__")]:
        monkeypatch.delenv(key)
    lines = []
    result = run_demo(tmp_path / "demo", customers=3000, survey_rows=1500, image_size=(48, 32),
                      out=lines.append)
    assert result["impute"]["rows"] == 1500 and result["segment"]["rows"] == 3000
    survey = pd.read_parquet(tmp_path / "demo" / "data" / "survey")
    filled = pd.read_parquet(result["impute"]["tables"][0])
    assert not filled.isna().any().any() and len(filled) == len(survey)

    snapshots = result["iceberg"]
    assert [s["model"].split("k=")[1] for s in snapshots] == ["2", "3"]
    catalog = load_catalog("demo", type="sql", uri=f"sqlite:///{tmp_path / 'demo' / 'iceberg' / 'catalog.db'}",
                           warehouse=(tmp_path / "demo" / "iceberg" / "warehouse").as_uri())
    table = catalog.load_table(("survey", "imputed"))
    previous = table.scan(snapshot_id=snapshots[0]["snapshot_id"]).to_pandas()
    current = table.scan().to_pandas()
    assert len(previous) == len(current) == 1500
    assert sorted(current["respondent_id"]) == sorted(survey["respondent_id"])
    assert any("the previous snapshot stays readable" in line for line in lines)
