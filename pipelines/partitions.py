"""What Dask workers run on each partition or chunk of a flow's data.

These functions live apart from the flow modules so that workers import them by their
package path, however a deployment loads its flow (module path or script path).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["filled_marks", "label_partition", "read_rows", "scaled_table", "segment_frame"]


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


def read_rows(path, start, stop):
    """Rows ``start:stop`` of a ``.npy`` file, read through a memory map."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])
