"""What Dask workers run on each partition or chunk of a flow's data.

These functions live apart from the flow modules so that workers import them by their
package path, however a deployment loads its flow (module path or script path).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["filled_marks", "image_features", "image_rows", "label_partition", "read_image",
           "scaled_table", "segment_frame"]


def filled_marks(part, id_column, columns):
    """The id column and, per column, True where the cell is missing (and will be filled)."""
    marks = pd.DataFrame({c: part[c].isna().to_numpy() for c in columns}, index=part.index)
    marks.insert(0, id_column, part[id_column].to_numpy())
    return marks.reset_index(drop=True)


def scaled_table(table, scaling):
    """The table with the scaled features standardized: (x - center) / scale."""
    if not scaling:
        return table
    return table.assign(**{c: (table[c] - m) / s for c, (m, s) in scaling.items()})


def segment_frame(ids, proba, id_column):
    """Ids, most probable segment and membership probabilities ``p_0 .. p_{k-1}``."""
    out = pd.DataFrame({id_column: ids})
    out["segment"] = proba.argmax(axis=1).astype(np.int64) if proba.shape[0] else np.empty(0, np.int64)
    for j in range(proba.shape[1]):
        out[f"p_{j}"] = proba[:, j]
    return out


def label_partition(part, model, id_column, features, scaling):
    """Segment table of one partition: the model's membership probabilities of every row."""
    X = scaled_table(part[features], scaling)
    proba = np.asarray(model.predict_proba(X), dtype=np.float64)
    return segment_frame(part[id_column].to_numpy(), proba, id_column)


def image_features(rgb, position_weight=None):
    """Pixel features: R, G, B and, with a position weight, x and y scaled to 0..255 × weight.

    Parameters
    ----------
    rgb : ndarray of shape (height, width, 3), uint8
    position_weight : float or None

    Returns
    -------
    ndarray of shape (height * width, 3 or 5), float32
    """
    h, w, _ = rgb.shape
    colour = rgb.reshape(-1, 3).astype(np.float32)
    if not position_weight:
        return colour
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs *= 255.0 * position_weight / max(1, w - 1)
    ys *= 255.0 * position_weight / max(1, h - 1)
    return np.concatenate([colour, xs.reshape(-1, 1), ys.reshape(-1, 1)], axis=1)


def read_image(url, storage_options=None):
    """The image at ``url`` (a local path or any fsspec URL), decoded by Pillow."""
    import io

    from PIL import Image

    from .sources import filesystem

    fs, path = filesystem(url, storage_options)
    data = fs.cat_file(path)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def image_rows(url, start, stop, position_weight=None, storage_options=None):
    """Pixel features of the image rows ``start:stop`` (see :func:`image_features`).

    Positions are scaled by the whole image's size, so chunks fit together.
    """
    rgb = np.asarray(read_image(url, storage_options).convert("RGB"))
    features = image_features(rgb, position_weight)
    width = rgb.shape[1]
    return np.ascontiguousarray(features[start * width:stop * width])
