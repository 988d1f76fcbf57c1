"""The coin examples: EM where it is easiest to follow, computed by emdask's own EM.

1. **One coin, two lost flips.** A coin is flipped twelve times; ten flips were seen, six of
   them heads, and two were lost. Starting from a bias of 0.5, EM treats the lost flips as
   hidden: the E-step expects one head and one tail among them, so the first M-step gives
   (6 + 1) / 12 = 7/12 ≈ 0.5833, the next (6 + 2·7/12) / 12 ≈ 0.5972, and so on to 0.6, the
   share of heads among the flips that were seen. This is :class:`~emdask.BernoulliMixture`
   with one component and ``missing='expected'`` (lost cells as hidden variables).

2. **Two coins of unknown bias** (Do & Batzoglou, "What is the expectation maximization
   algorithm?", Nature Biotechnology 26, 2008). Five sets of ten flips; each set was made
   with coin A or coin B, chosen at random, and which coin is unknown. From θA = 0.6 and
   θB = 0.5, the first iteration gives θA ≈ 0.71, θB ≈ 0.58 and ten iterations
   θA ≈ 0.80, θB ≈ 0.52. This is :class:`~emdask.BinomialMixture` with ``n_trials=10`` and
   mixing weights held at 1/2 (``fit_weights=False``).

Run ``python -m emdask.coin`` (or ``emdask coin``) to print both traces.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .estimators.counts import BernoulliMixture, BinomialMixture
from .exceptions import ConvergenceWarning

__all__ = [
    "SINGLE_COIN_FLIPS",
    "TWO_COIN_SETS",
    "format_trace",
    "main",
    "single_coin_trace",
    "two_coins_trace",
]

#: Twelve flips of one coin: 1 = heads, 0 = tails, NaN = lost (6 heads among 10 seen).
SINGLE_COIN_FLIPS = (1, 0, 1, 1, 0, np.nan, 1, 0, 1, 0, 1, np.nan)

#: The five sets of ten flips of Do & Batzoglou (2008), Figure 1.
TWO_COIN_SETS = (
    "HTTTHHTHTH",
    "HHHHTHHHHH",
    "HTHHHHHTHH",
    "HTHTTTHHTT",
    "THHHTHHHTH",
)


def _trace_fit(model, X, record, start, **fit_kwargs):
    """Fit ``model`` for exactly ``max_iter`` iterations; the estimate after each M-step."""
    trace = [(0, *start)]

    def callback(info):
        trace.append((info.iteration, *record(info.params)))

    with warnings.catch_warnings():
        # a fixed number of iterations is the point of a trace, not a failure to converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, callbacks=[callback], **fit_kwargs)
    return trace


def single_coin_trace(n_iter=10, start=0.5, flips=SINGLE_COIN_FLIPS):
    """EM for the bias of one coin with lost flips.

    Parameters
    ----------
    n_iter : int, default=10
        EM iterations to run.
    start : float, default=0.5
        Starting bias (probability of heads).
    flips : sequence of 0, 1 and NaN
        The flips; NaN marks a lost flip.

    Returns
    -------
    list of (int, float)
        ``(iteration, estimated bias)``, from ``(0, start)`` to ``(n_iter, ...)``.
    """
    X = pd.DataFrame({"heads": np.asarray(flips, dtype=np.float64)})
    model = BernoulliMixture(
        1,
        alpha=0.0,
        algorithm="em",  # the textbook iterations, one pass each
        missing="expected",
        probabilities_init=[[start]],
        tol=0.0,
        max_iter=n_iter,
    )
    return _trace_fit(model, X, lambda p: (float(p.probabilities[0, 0]),), (float(start),))


def two_coins_trace(n_iter=10, start=(0.6, 0.5), sets=TWO_COIN_SETS):
    """EM for the biases of two coins from sets of flips of unknown coin.

    Parameters
    ----------
    n_iter : int, default=10
    start : (float, float), default=(0.6, 0.5)
        Starting biases of coin A and coin B.
    sets : sequence of str
        One string of ``H`` / ``T`` per set; all sets have the same length.

    Returns
    -------
    list of (int, float, float)
        ``(iteration, θA, θB)``, from ``(0, *start)`` to ``(n_iter, ...)``.
    """
    lengths = {len(s) for s in sets}
    if len(lengths) != 1:
        raise ValueError("every set must have the same number of flips")
    X = pd.DataFrame({"heads": [s.upper().count("H") for s in sets]})
    model = BinomialMixture(
        2,
        n_trials=lengths.pop(),
        alpha=0.0,
        algorithm="em",  # the textbook iterations, one pass each
        fit_weights=False,
        weights_init=[0.5, 0.5],
        probabilities_init=list(start),
        tol=0.0,
        max_iter=n_iter,
    )
    record = lambda p: (float(p.probabilities[0]), float(p.probabilities[1]))  # noqa: E731
    return _trace_fit(model, X, record, tuple(float(s) for s in start))


def format_trace(trace, names=("estimate",), digits=4):
    """A trace as an aligned text table.

    Parameters
    ----------
    trace : list of tuples
        ``(iteration, value, ...)`` rows.
    names : sequence of str
        Heading of each value column.
    digits : int
        Decimals shown.
    """
    width = max(digits + 3, *(len(n) for n in names))
    lines = ["iteration  " + "  ".join(f"{n:>{width}}" for n in names)]
    for row in trace:
        lines.append(f"{row[0]:9d}  " + "  ".join(f"{v:>{width}.{digits}f}" for v in row[1:]))
    return "\n".join(lines)


def main(print_fn=print):
    """Print both coin traces."""
    print_fn("One coin, twelve flips: 6 heads among the 10 seen, 2 lost (EM from 0.5)")
    print_fn(format_trace(single_coin_trace(n_iter=8), ("bias",), digits=6))
    print_fn("")
    print_fn("Two coins, five sets of ten flips, coin of each set unknown (Do & Batzoglou 2008)")
    print_fn(format_trace(two_coins_trace(), ("theta_A", "theta_B")))


if __name__ == "__main__":
    main()
