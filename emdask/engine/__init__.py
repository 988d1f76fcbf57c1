"""The map-reduce EM driver over Dask collections; knows nothing about any one model."""

from .data import BlockData, DataSummary, map_fill, map_rows, prepare, select_columns
from .driver import EMModel, IterationInfo, bootstrap_weights, format_iteration, run_em
from .kmeans import kmeans_parallel, kmeans_plusplus, sample_rows

__all__ = [
    "BlockData",
    "DataSummary",
    "EMModel",
    "IterationInfo",
    "bootstrap_weights",
    "format_iteration",
    "kmeans_parallel",
    "kmeans_plusplus",
    "map_fill",
    "map_rows",
    "prepare",
    "run_em",
    "sample_rows",
    "select_columns",
]
