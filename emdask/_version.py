"""The version of emdask (one place, read by the package and its file formats)."""

__version__ = "0.1.0"
