"""The ``coin-examples`` flow: EM traces of the two coin examples, recorded as a Prefect run."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

__all__ = ["coin_examples"]


@task(cache_policy=NO_CACHE)
def coin_traces() -> str:
    """Run EM on the one-coin and two-coin examples and return both traces as text."""
    from emdask import coin

    lines = []
    coin.main(print_fn=lines.append)
    return "\n".join(lines)


@flow(name="coin-examples")
def coin_examples() -> str:
    """EM step by step on a coin with lost flips and on two coins of unknown bias."""
    text = coin_traces()
    create_markdown_artifact(
        markdown="# EM on the coin examples\n\n```\n" + text + "\n```\n",
        key="coin-examples-trace",
        description="EM traces of the coin examples",
    )
    return text
