"""SQUAREM: squared extrapolation of the EM map, for any family (Varadhan & Roland 2008).

Plain EM converges linearly, slowly when components overlap or many cells are missing, and
every iteration is a full pass over the data. SQUAREM (scheme S3) takes two EM steps from an
accepted point ``x0`` — ``x1 = F(x0)``, ``x2 = F(x1)`` — and jumps to

    x' = x0 + 2 a r + a² v,    r = x1 - x0,   v = x2 - 2 x1 + x0,   a = |r| / |v|

(``a = 1`` gives ``x2``, the plain double step). Each evaluation of ``F`` is one pass of the
existing map-reduce; the same pass gives the log-likelihood of the point it evaluates, so the
safeguard costs nothing extra:

=====  ===========================  ===================================================
phase  the pass evaluates           then
=====  ===========================  ===================================================
0      an accepted point ``x0``     ``x1 = F(x0)`` is evaluated next
1      ``x1``                       ``x2 = F(x1)``; extrapolate to ``x'`` (or go on from
                                    ``x2`` when ``a = 1``)
2      ``x'``                       kept when ``L(x') >= L(x1)``: its EM image ``F(x')`` is
                                    the next ``x0`` (the stabilisation step); otherwise
                                    rejected and ``x2`` is the next ``x0``
=====  ===========================  ===================================================

So a cycle costs three passes, like R's ``SQUAREM::squarem`` (whose objective evaluations
come for free here), and the log-likelihood of the accepted points never decreases (EM steps
do not decrease it, an extrapolation is kept only when it does not). The step length is
bounded by ``step_max``, which starts at 1 and is multiplied by 4 each time the bound is
reached by a kept step, and divided by 4 when such a step is rejected (the "global" step
control of the SQUAREM package).

Parameters are extrapolated in unconstrained coordinates provided by each family
(``family.to_unconstrained(params)`` / ``family.from_unconstrained(z, like)``: log-ratio
weights, Cholesky factors with log diagonals, logits and logs), so every extrapolated point
is a valid model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ALGORITHMS", "Squarem"]

#: Values of the ``algorithm`` argument: plain EM and SQUAREM-accelerated EM.
ALGORITHMS = ("em", "squarem")

#: Growth (and shrink) factor of the step bound.
STEP_FACTOR = 4.0


@dataclass(eq=False)
class Squarem:
    """The accelerator's state for one model (see the module docstring).

    Attributes
    ----------
    phase : int
        What the next pass evaluates: 0 an accepted point, 1 its EM image, 2 an
        extrapolated point (``pending``).
    step_max : float
        Bound of the step length ``a``.
    alpha : float
        Step length of the pending extrapolation.
    base, first : ndarray or None
        Unconstrained ``x0`` and ``x1`` of the current cycle.
    pending : params or None
        The extrapolated point to evaluate next (phase 2 only).
    """

    phase: int = 0
    step_max: float = 1.0
    alpha: float = 1.0
    base: np.ndarray | None = None
    first: np.ndarray | None = None
    pending: object = None

    def point(self, params):
        """The parameters the next pass evaluates, given the model's accepted ``params``."""
        return self.pending if self.phase == 2 else params

    def update(self, family, evaluated, loglik, image, best):
        """Take the result of one pass.

        Parameters
        ----------
        family
            Provides ``to_unconstrained`` / ``from_unconstrained``.
        evaluated : params
            The point the pass evaluated (``self.point(...)``).
        loglik : float
            Its mean log-likelihood.
        image : params
            Its EM image (the M-step of the pass's statistics).
        best : float
            Mean log-likelihood of the last accepted point.

        Returns
        -------
        accepted : bool
            Whether ``evaluated`` is accepted (its log-likelihood joins the history).
        params : params or None
            The model's new accepted-side parameters (the EM image of the last accepted
            point); ``None`` leaves them unchanged.
        """
        if self.phase == 0:
            self.base = family.to_unconstrained(evaluated)
            self.phase = 1
            return True, image
        if self.phase == 1:
            self.first = family.to_unconstrained(evaluated)
            self._extrapolate(family, family.to_unconstrained(image), image)
            return True, image
        # phase 2: an extrapolated point
        self.pending = None
        self.phase = 0
        self.base = self.first = None
        if math.isfinite(loglik) and loglik >= best:
            if self.alpha >= self.step_max:
                self.step_max *= STEP_FACTOR
            return True, image
        if self.alpha >= self.step_max:
            self.step_max = max(1.0, self.step_max / STEP_FACTOR)
        return False, None

    def _extrapolate(self, family, second, image):
        r = self.first - self.base
        v = second - self.first - r
        sr, sv = float(r @ r), float(v @ v)
        alpha = math.sqrt(sr / sv) if sv > 0 else math.inf
        if not math.isfinite(alpha) and sr == 0:
            alpha = 1.0
        alpha = min(max(alpha, 1.0), self.step_max)
        self.alpha = alpha
        if abs(alpha - 1.0) <= 0.01:  # no extrapolation: go on from x2 = F(x1)
            if alpha >= self.step_max:
                self.step_max *= STEP_FACTOR
            self.phase = 0
            self.base = self.first = None
            return
        z = self.base + 2.0 * alpha * r + alpha * alpha * v
        try:
            if not np.all(np.isfinite(z)):
                raise ValueError("non-finite extrapolation")
            pending = family.from_unconstrained(z, image)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            self.step_max = max(1.0, self.step_max / STEP_FACTOR)
            self.phase = 0
            self.base = self.first = None
            return
        self.pending = pending
        self.phase = 2

    # -- checkpoints ------------------------------------------------------------------------

    def state(self, family):
        """``(scalars, arrays)``: the state as JSON-able numbers and flat float arrays."""
        scalars = {"phase": self.phase, "step_max": self.step_max, "alpha": self.alpha}
        arrays = {}
        if self.base is not None:
            arrays["base"] = self.base
        if self.first is not None:
            arrays["first"] = self.first
        if self.pending is not None:
            arrays["pending"] = family.to_unconstrained(self.pending)
        return scalars, arrays

    @classmethod
    def from_state(cls, family, scalars, arrays, like):
        """The accelerator written by :meth:`state` (``like``: the model's parameters)."""
        pending = arrays.get("pending")
        return cls(
            phase=int(scalars["phase"]),
            step_max=float(scalars["step_max"]),
            alpha=float(scalars["alpha"]),
            base=arrays.get("base"),
            first=arrays.get("first"),
            pending=None if pending is None else family.from_unconstrained(pending, like),
        )
