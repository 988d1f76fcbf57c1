"""Small tables, images and helpers shared by the pipeline tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd


def write_dataset(df, path, npartitions=3):
    """Write ``df`` as a partitioned Parquet dataset at ``path``; returns the path as str."""
    import dask.dataframe as dd

    dd.from_pandas(df, npartitions=npartitions, sort=False).to_parquet(str(path), write_index=False)
    return str(path)


def tree_digest(path):
    """Digest of every file's relative path and bytes under ``path`` (to prove nothing changed)."""
    h = hashlib.sha256()
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def survey_frame(n=600, seed=0, categorical=False):
    """A small survey: two correlated numeric answers and, optionally, a category; some missing."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    x = rng.normal(np.array([0.0, 4.0])[group], 1.0)
    df = pd.DataFrame({
        "rid": np.arange(1000, 1000 + n, dtype=np.int64),
        "x": x,
        "y": 2.0 * x + rng.normal(0, 0.5, n),
        "z": rng.normal(10, 2, n),
    })
    if categorical:
        df["colour"] = pd.array(np.where(group == 0, "red", "blue"), dtype="string")
    for c in [c for c in df.columns if c != "rid"]:
        df.loc[rng.random(n) < 0.1, c] = None
    return df


def customers_frame(n=900, seed=1):
    """Three well separated customer groups on two numeric features."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 3, n)
    return pd.DataFrame({
        "cid": np.arange(n, dtype=np.int64),
        "spend": np.array([10.0, 60.0, 200.0])[g] + rng.normal(0, 4, n),
        "visits": np.array([2.0, 8.0, 20.0])[g] + rng.normal(0, 1, n),
    })


def image_array(width=96, height=64, seed=2):
    """Three coloured regions with noise, as an RGB uint8 array."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float64)
    img[:] = (30, 60, 200)
    img[height // 2:, :] = (40, 160, 50)
    img[5:20, 60:85] = (240, 220, 40)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def published_dir(dest):
    """The published version's folder of a local destination, or None."""
    from pipelines.versions import open_destination

    published = open_destination(str(dest)).published()
    return None if published is None else Path(published.url)
