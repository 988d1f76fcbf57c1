"""The demo: generate example data, run the three flows on a local Dask cluster, show the results.

``make demo`` (or ``emdask demo``) writes under ``demo-output/``::

    data/survey/               survey answers with missing cells (numeric and categorical)
    data/customers/            1,000,000 customers as partitioned Parquet
    data/landscape.png         a generated 1600x1000 image
    published/...              the flows' published versions (CURRENT + versions/)
    iceberg/                   a local Iceberg catalog (SQLite file + warehouse folder) holding
                               the table survey.imputed, committed twice (two snapshots)
    .prefect/                  the local Prefect database recording the runs

The data are drawn from known latent groups (respondent types, customer segments, image
regions), so the fitted models have something to find. Everything is seeded: the same
command gives the same data and the same results.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["make_customers", "make_image", "make_survey", "prepare_environment", "run_demo"]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def make_survey(n_rows=100_000, seed=0):
    """A survey of ``n_rows`` respondents of three latent types, with answers missing at random.

    Numeric answers: age, income (thousands), weekly hours worked, commute minutes,
    satisfaction (0-10); categorical: region, employment, education; boolean: owns_home.
    Income is skipped more often by older respondents, satisfaction by the least satisfied
    employment groups: missing at random given the other answers, as EM assumes.
    """
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n_rows, p=[0.45, 0.35, 0.20])  # workers, young, retired
    age = rng.normal(np.array([42, 26, 70])[kind], np.array([9, 5, 7])[kind])
    age = np.round(np.clip(age, 18, 95), 0)
    income = np.exp(rng.normal(np.log([62, 31, 38])[kind], 0.35))
    hours = np.clip(rng.normal(np.array([40, 24, 3])[kind], np.array([6, 10, 4])[kind]), 0, 80)
    commute = np.clip(rng.normal(np.array([35, 25, 8])[kind], np.array([15, 12, 6])[kind]), 0, 180)
    satisfaction = np.clip(np.round(rng.normal(np.array([6.5, 5.5, 7.5])[kind], 1.6), 1), 0, 10)
    employment = np.where(
        kind == 0, rng.choice(["employed", "self-employed"], n_rows, p=[0.8, 0.2]),
        np.where(kind == 1, rng.choice(["employed", "student", "unemployed"], n_rows, p=[0.5, 0.35, 0.15]),
                 rng.choice(["retired", "employed"], n_rows, p=[0.9, 0.1])))
    education = np.where(
        kind == 1, rng.choice(["secondary", "bachelor", "master"], n_rows, p=[0.4, 0.45, 0.15]),
        rng.choice(["secondary", "bachelor", "master"], n_rows, p=[0.5, 0.35, 0.15]))
    region = rng.choice(["north", "south", "east", "west", "central"], n_rows)
    owns_home = rng.random(n_rows) < np.array([0.65, 0.2, 0.85])[kind]
    df = pd.DataFrame({
        "respondent_id": np.arange(1, n_rows + 1, dtype=np.int64),
        "age": age,
        "income": np.round(income, 2),
        "hours_worked": np.round(hours, 1),
        "commute_minutes": np.round(commute, 0),
        "satisfaction": satisfaction,
        "region": pd.array(region, dtype="string"),
        "employment": pd.array(employment, dtype="string"),
        "education": pd.array(education, dtype="string"),
        "owns_home": pd.array(owns_home, dtype="boolean"),
    })
    p_income = 0.05 + 0.20 * (age > 60)
    p_satisfaction = np.where(employment == "unemployed", 0.25, 0.06)
    rates = {
        "age": 0.03, "income": p_income, "hours_worked": 0.08, "commute_minutes": 0.12,
        "satisfaction": p_satisfaction, "region": 0.02, "employment": 0.05,
        "education": 0.10, "owns_home": 0.07,
    }
    for column, rate in rates.items():
        df.loc[rng.random(n_rows) < rate, column] = None
    return df


#: Customer segments: share, then (mean, standard deviation) of recency days, orders per
#: year, order value, tenure months and web share.
_SEGMENTS = [
    (0.35, [(20, 5), (24, 4), (35, 8), (48, 12), (0.80, 0.06)]),    # loyal online regulars
    (0.25, [(45, 10), (8, 2), (120, 20), (60, 15), (0.30, 0.08)]),   # big baskets, in shops
    (0.25, [(150, 30), (3, 0.8), (60, 12), (12, 3), (0.50, 0.10)]),  # occasional, recent sign-ups
    (0.15, [(300, 40), (1.5, 0.4), (40, 8), (90, 15), (0.20, 0.06)]),  # lapsing long-standing
]


def make_customers(n_rows=1_000_000, seed=1):
    """``n_rows`` customers from four segments: recency, orders, order value, tenure, web share.

    2% of the order values are unknown (missing cells, marginalized by the model).
    """
    rng = np.random.default_rng(seed)
    shares = np.array([share for share, _ in _SEGMENTS])
    mean = np.array([[m for m, _ in cols] for _, cols in _SEGMENTS])
    sd = np.array([[s for _, s in cols] for _, cols in _SEGMENTS])
    seg = rng.choice(len(shares), size=n_rows, p=shares / shares.sum())
    values = mean[seg] + rng.normal(size=(n_rows, mean.shape[1])) * sd[seg]
    values[:, :4] = np.maximum(values[:, :4], 0)
    values[:, 4] = np.clip(values[:, 4], 0, 1)
    df = pd.DataFrame({
        "customer_id": np.arange(10_000_001, 10_000_001 + n_rows, dtype=np.int64),
        "recency_days": np.round(values[:, 0], 1),
        "orders_per_year": np.round(values[:, 1], 2),
        "avg_order_value": np.round(values[:, 2], 2),
        "tenure_months": np.round(values[:, 3], 1),
        "web_share": np.round(values[:, 4], 3),
    })
    df.loc[rng.random(n_rows) < 0.02, "avg_order_value"] = np.nan
    return df


def make_image(width=1600, height=1000, seed=2):
    """A landscape: sky, sun, sea, beach and hills with texture, as an RGB uint8 array."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    t = (y / height)[..., None]
    img[:] = (1 - t) * np.array([90, 140, 220]) + t * np.array([180, 210, 240])  # sky
    sea_top = 0.55 * height + 6 * np.sin(x / 40)
    sea = y > sea_top
    img[sea] = np.array([20, 70, 130]) + np.array([10, 10, 15]) * np.sin(x[sea] / 9 + y[sea] / 5)[:, None]
    hill = y > height * (0.95 - 0.7 * np.exp(-(((x - 0.2 * width) / (0.18 * width)) ** 2)))
    img[hill] = [60, 130, 60]
    beach = y > 0.8 * height - 0.08 * (x - width / 2)
    img[beach] = [220, 200, 150]
    sun = (x - 0.75 * width) ** 2 + (y - 0.2 * height) ** 2 < (0.07 * height) ** 2
    img[sun] = [250, 220, 80]
    img += rng.normal(0, 7, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_parquet(df, path, npartitions):
    import dask.dataframe as dd

    shutil.rmtree(path, ignore_errors=True)
    dd.from_pandas(df, npartitions=npartitions, sort=False).to_parquet(str(path), write_index=False)


# --------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------


def prepare_environment(output="demo-output"):
    """The demo's environment (before Prefect is imported): a local Iceberg catalog under
    OUTPUT, and, with no PREFECT_API_URL, the local Prefect database there too."""
    output = Path(output).resolve()
    # a local Iceberg catalog, configured the way pyiceberg reads any catalog
    iceberg = output / "iceberg"
    iceberg.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(f"PYICEBERG_CATALOG__{ICEBERG_CATALOG.upper()}__TYPE", "sql")
    os.environ.setdefault(f"PYICEBERG_CATALOG__{ICEBERG_CATALOG.upper()}__URI",
                          f"sqlite:///{iceberg / 'catalog.db'}")
    os.environ.setdefault(f"PYICEBERG_CATALOG__{ICEBERG_CATALOG.upper()}__WAREHOUSE",
                          (iceberg / "warehouse").as_uri())
    if not os.environ.get("PREFECT_API_URL"):
        # a local ephemeral API whose database stays with the demo's outputs
        os.environ.setdefault("PREFECT_HOME", str(output / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def run_demo(output="demo-output", customers=1_000_000, survey_rows=100_000,
             image_size=(1600, 1000), out=print):
    """Generate the data, run the three flows against one local Dask cluster, print a summary."""
    started = time.perf_counter()
    output = Path(output).resolve()
    data, published = output / "data", output / "published"
    data.mkdir(parents=True, exist_ok=True)
    prepare_environment(output)
    iceberg = output / "iceberg"

    from PIL import Image

    out(f"generating data under {data}")
    survey = make_survey(survey_rows)
    _write_parquet(survey, data / "survey", npartitions=4)
    out(f"  survey: {len(survey):,} respondents, {survey.isna().sum().sum():,} missing answers "
        f"in {int((survey.isna().sum() > 0).sum())} columns -> {data / 'survey'}")
    del survey
    table = make_customers(customers)
    _write_parquet(table, data / "customers", npartitions=max(1, customers // 125_000))
    out(f"  customers: {len(table):,} rows -> {data / 'customers'}")
    del table
    Image.fromarray(make_image(*image_size)).save(data / "landscape.png")
    out(f"  image: {image_size[0]}x{image_size[1]} -> {data / 'landscape.png'}")

    from .cluster import dask_client
    from .image import segment_image
    from .impute import impute_survey
    from .segment import segment_customers

    with dask_client() as client:
        address = client.scheduler.address
        out(f"local Dask cluster at {address}: {len(client.scheduler_info()['workers'])} workers")
        imputed = impute_survey(
            str(data / "survey"), str(published / "survey-imputed"), "respondent_id",
            n_components=3, dask_address=address, keep_versions=3, force=True,
        )
        segmented = segment_customers(
            str(data / "customers"), str(published / "customer-segments"), "customer_id",
            k_min=2, k_max=6, scale=True, dask_address=address, keep_versions=3, force=True,
        )
        pictured = segment_image(
            str(data / "landscape.png"), str(published / "landscape-segments"),
            n_components=6, position=True, position_weight=0.3, dask_address=address,
            keep_versions=3, force=True,
        )
        snapshots = _iceberg_demo(data / "survey", address, out)

    seconds = time.perf_counter() - started
    out("")
    out(f"demo finished in {seconds:.0f} s; everything is under {output}")
    out(f"impute-survey: {imputed['rows']:,} rows, {imputed['filled_cells']:,} cells filled, "
        f"{imputed['model']} k={imputed['n_components']}, {imputed['n_iter']} EM iterations")
    out(f"  table:   {imputed['tables'][0]}")
    out(f"  model:   {imputed['model_path']}")
    out(f"  plot:    {imputed['plots'][0]}")
    out(f"segment-customers: {segmented['rows']:,} rows, k={segmented['n_components']} chosen by BIC "
        f"among {segmented['searched'][0]}..{segmented['searched'][-1]}, rows per segment "
        f"{segmented['counts']}")
    out(f"  tables:  {segmented['tables'][0]}")
    out(f"           {segmented['tables'][1]}")
    out(f"  model:   {segmented['model_path']}")
    out(f"  plots:   {segmented['plots'][0]}")
    out(f"           {segmented['plots'][1]}")
    out(f"segment-image: {pictured['width']}x{pictured['height']}, k={pictured['n_components']}, "
        f"{pictured['n_iter']} EM iterations")
    out(f"  image:   {pictured['image']}")
    out(f"  labels:  {pictured['labels']}")
    out(f"  model:   {pictured['model_path']}")
    out(f"  plot:    {pictured['plots'][0]}")
    out("each destination's CURRENT file names its published version under versions/")
    out(f"iceberg: {ICEBERG_TABLE} in the SQLite catalog {iceberg / 'catalog.db'}, one snapshot per run:")
    for snap in snapshots:
        out(f"  snapshot {snap['snapshot_id']}: {snap['rows']:,} rows, {snap['model']}, "
            f"version {snap['version']}")
    if len(snapshots) > 1:
        out(f"  the previous snapshot stays readable: emdask impute {ICEBERG_TABLE}@"
            f"{snapshots[-2]['snapshot_id']} ... reads it, as does any Iceberg engine")
    if os.environ.get("PREFECT_HOME") == str(output / ".prefect"):
        out(f"runs are recorded in {output / '.prefect'}; browse them with "
            f"PREFECT_HOME={output / '.prefect'} prefect server start")
    return {"impute": imputed, "segment": segmented, "image": pictured, "iceberg": snapshots,
            "seconds": seconds}


ICEBERG_CATALOG = "demo"
ICEBERG_TABLE = f"iceberg://{ICEBERG_CATALOG}/survey.imputed"


def _iceberg_demo(survey, address, out):
    """Impute the survey into an Iceberg table twice (k=2, then k=3): two snapshots, both readable."""
    from .impute import impute_survey
    from .sources import load_iceberg_catalog

    catalog = load_iceberg_catalog(ICEBERG_CATALOG, ICEBERG_TABLE)
    catalog.create_namespace_if_not_exists("survey")
    for k in (2, 3):
        impute_survey(str(survey), ICEBERG_TABLE, "respondent_id", n_components=k,
                      dask_address=address, force=True)
    table = catalog.load_table(("survey", "imputed"))
    shown = []
    for snap in table.snapshots():
        props = snap.summary.additional_properties if snap.summary else {}
        if "emdask.version" not in props or snap.summary.operation.value == "delete":
            continue
        rows = int(props.get("total-records", 0))
        manifest = props.get("emdask.manifest", "")
        shown.append({"snapshot_id": snap.snapshot_id, "version": props["emdask.version"],
                      "rows": rows, "model": _model_of(manifest)})
    out(f"published {len(shown)} snapshots of {ICEBERG_TABLE}")
    return shown[-2:]


def _model_of(manifest_url):
    import json

    from .sources import filesystem

    try:
        fs, path = filesystem(manifest_url)
        fit = json.loads(fs.cat_file(path))["fit"]
        return f"{fit['model_class']} k={fit['n_components']}"
    except Exception:
        return "?"


def main(argv=None):
    from .cli import main as cli_main

    return cli_main(["demo", *(argv or [])])


if __name__ == "__main__":
    raise SystemExit(main())
