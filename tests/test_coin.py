"""The coin examples, against the arithmetic of the textbook."""

from __future__ import annotations

import subprocess
import sys
from math import comb

import numpy as np
import pytest

from emdask.coin import (
    SINGLE_COIN_FLIPS,
    TWO_COIN_SETS,
    format_trace,
    main,
    single_coin_trace,
    two_coins_trace,
)


def test_the_data_is_the_story():
    flips = np.asarray(SINGLE_COIN_FLIPS, dtype=float)
    assert flips.size == 12
    assert np.isnan(flips).sum() == 2
    assert np.nansum(flips) == 6
    assert [s.count("H") for s in TWO_COIN_SETS] == [5, 9, 8, 4, 7]


def test_single_coin_first_m_step_is_seven_twelfths_and_converges_to_six_tenths():
    trace = single_coin_trace(n_iter=10)
    assert [it for it, _ in trace] == list(range(11))
    assert trace[0][1] == 0.5
    # E-step: the two lost flips are expected to hold 2 × 0.5 heads
    assert trace[1][1] == pytest.approx(7 / 12, abs=1e-14)
    assert trace[2][1] == pytest.approx((6 + 2 * 7 / 12) / 12, abs=1e-14)
    # the error shrinks by 2/12 each iteration, towards 6/10
    errors = np.array([0.6 - p for _, p in trace])
    np.testing.assert_allclose(errors[1:], errors[:-1] / 6, rtol=1e-6)
    assert trace[-1][1] == pytest.approx(0.6, abs=1e-8)


def test_single_coin_from_another_start():
    trace = single_coin_trace(n_iter=30, start=0.1)
    assert trace[1][1] == pytest.approx((6 + 2 * 0.1) / 12, abs=1e-14)
    assert trace[-1][1] == pytest.approx(0.6, abs=1e-12)


def textbook_iteration(theta_a, theta_b, heads, n=10):
    """One EM iteration of Do & Batzoglou (2008), Figure 1b, written out."""
    ha = ta = hb = tb = 0.0
    for h in heads:
        la = comb(n, h) * theta_a**h * (1 - theta_a) ** (n - h)
        lb = comb(n, h) * theta_b**h * (1 - theta_b) ** (n - h)
        ra = la / (la + lb)
        ha += ra * h
        ta += ra * (n - h)
        hb += (1 - ra) * h
        tb += (1 - ra) * (n - h)
    return ha / (ha + ta), hb / (hb + tb)


def test_two_coins_reproduce_the_textbook_iteration():
    trace = two_coins_trace(n_iter=10)
    assert trace[0] == (0, 0.6, 0.5)
    heads = [s.count("H") for s in TWO_COIN_SETS]
    theta = (0.6, 0.5)
    for it, a, b in trace[1:]:
        theta = textbook_iteration(*theta, heads)
        assert (a, b) == pytest.approx(theta, abs=1e-12), it
    # the numbers printed in the paper's figure
    assert trace[1][1:] == pytest.approx((0.71, 0.58), abs=0.005)
    assert trace[10][1:] == pytest.approx((0.80, 0.52), abs=0.005)


def test_format_trace_and_main_print_both_traces():
    text = format_trace([(0, 0.5), (1, 7 / 12)], ("bias",), digits=6)
    assert text.splitlines() == ["iteration       bias", "        0   0.500000", "        1   0.583333"]
    lines = []
    main(print_fn=lines.append)
    out = "\n".join(lines)
    assert "0.583333" in out and "0.600000" in out
    assert "0.7130" in out and "0.5813" in out and "0.7967" in out


def test_module_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "-m", "emdask.coin"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "0.583333" in done.stdout and "theta_A" in done.stdout
