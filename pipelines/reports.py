"""Plots and run summaries: PNG files beside each version, Prefect artifacts in the UI."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

__all__ = [
    "log_singular_candidates",
    "warnings_to_log",
    "convergence_plot",
    "create_artifacts",
    "format_duration",
    "summary_markdown",
]


@contextlib.contextmanager
def warnings_to_log(logger):
    """Send the warnings raised inside the block (emdask's data and convergence warnings)
    to ``logger`` as warnings of the run, one line each, instead of the process's stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                text = f"{w.category.__name__}: {w.message}"
                if text not in seen:
                    seen.add(text)
                    logger.warning(text)


def log_singular_candidates(logger, table):
    """Log the candidates of a selection table that are singular (never chosen)."""
    if "singular" not in table:
        return
    for _, row in table[table["singular"]].iterrows():
        logger.warning(
            f"k={int(row['n_components'])} is singular and was not considered: "
            f"{row['singular_reason']}"
        )


def _figure(size=(6, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def convergence_plot(path, lower_bounds, *, title="EM convergence", label=None):
    """Write a PNG of the mean log-likelihood per EM iteration to ``path``; returns it.

    Parameters
    ----------
    lower_bounds : sequence of float
        The fitted model's ``lower_bounds_``.
    """
    fig = _figure()
    ax = fig.add_subplot()
    values = [float(v) for v in lower_bounds]
    ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean log-likelihood per row")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if label:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return Path(path)


def format_duration(seconds):
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)} min {secs:.0f} s"


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows, columns):
    """A markdown table of ``rows`` (dicts) with the given ``columns``."""
    head = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def summary_markdown(title, facts, tables=()):
    """Markdown for a run: a title, a list of facts, then (caption, rows, columns) tables."""
    lines = [f"# {title}", ""]
    for key, value in facts.items():
        lines.append(f"- **{key}**: {_cell(value)}")
    for caption, rows, columns in tables:
        if rows:
            lines += ["", f"## {caption}", "", markdown_table(rows, columns)]
    return "\n".join(lines) + "\n"


def create_artifacts(key, markdown, table=None, description=None):
    """Create the run's Prefect artifacts: a markdown summary and, optionally, a table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    ids = [create_markdown_artifact(markdown=markdown, key=f"{key}-summary", description=description)]
    if table:
        ids.append(create_table_artifact(table=table, key=f"{key}-table", description=description))
    return ids
