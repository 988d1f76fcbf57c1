"""The progress bar the flows and the command line show per EM iteration."""

import math

from pipelines.tasks import convergence_bar


def test_bar_is_empty_before_any_change_is_known():
    assert convergence_bar(None, math.inf, 1e-3) == "[--------------------]   0%"


def test_bar_moves_on_the_log_scale_of_the_change():
    # from a first change of 1e-1 toward tol=1e-3, a change of 1e-2 is half way (log scale)
    assert convergence_bar(1e-1, 1e-2, 1e-3) == "[##########----------]  50%"
    assert convergence_bar(1e-1, 1e-1 * 10 ** -0.5, 1e-3, width=8) == "[##------]  25%"


def test_bar_is_full_once_converged_and_never_goes_backwards_past_zero():
    assert convergence_bar(1e-1, 5e-4, 1e-3) == "[####################] 100%"
    assert convergence_bar(1e-2, 1e-1, 1e-3).endswith("  0%")
    assert convergence_bar(1e-2, -1e-4, 1e-3) == "[####################] 100%"
