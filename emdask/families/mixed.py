"""Mixed-type family: one latent segment over Gaussian, binary, categorical and count columns.

Given the segment, the column groups are independent: the Gaussian columns follow one
multivariate normal (``'diag'`` or ``'full'`` covariance), binary columns Bernoulli
distributions, categorical columns categorical distributions and count columns Poisson
distributions. A row's log-likelihood under segment ``k`` is ``log w_k`` plus one term per
group, so the family is the product mixture of :mod:`emdask.families.discrete` with a Gaussian
part added.

Missing cells: discrete cells are left out of the product; Gaussian cells are handled exactly
by the Gaussian kernel (conditional mean and covariance of the missing cells given the
observed ones, see :mod:`emdask.families.gaussian`). A row whose Gaussian cells are all
missing still informs the segment through its other cells.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .base import Stats, standard_normal
from .discrete import (
    BernoulliPart,
    CategoricalPart,
    PoissonPart,
    ProductMixtureFamily,
)
from .gaussian import (
    GaussianFamily,
    GaussianParams,
    _add_conditional_covariance,
    _components,
    _prepare,
    compute_precision_cholesky,
    gaussian_from_unconstrained,
    gaussian_to_unconstrained,
)

__all__ = ["MIXED_KINDS", "MixedFamily", "MixedParams", "GaussianPart"]

#: Column families a mixed table may hold, in the order their parts are evaluated.
MIXED_KINDS = ("gaussian", "bernoulli", "categorical", "poisson")
MIXED_COVARIANCE_TYPES = ("diag", "full")


class GaussianPart:
    """Continuous columns: one multivariate normal per component.

    ``theta``: :class:`GaussianParams` whose ``weights`` are all one (the mixing weights
    belong to the mixture, not to the part).
    """

    kind = "gaussian"

    def __init__(self, cols, covariance_type="diag", reg_covar=1e-6):
        if covariance_type not in MIXED_COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type={covariance_type!r} is not one of {list(MIXED_COVARIANCE_TYPES)}"
            )
        self.cols = np.asarray(cols, dtype=np.intp)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.dense = covariance_type == "full"

    def _gaussian(self, k):
        return GaussianFamily(k, self.covariance_type, self.reg_covar)

    def zero_terms(self, k):
        d = self.cols.size
        s2 = np.zeros((k, d, d)) if self.dense else np.zeros((k, d))
        return {"s1": np.zeros((k, d)), "s2": s2}

    def prepare(self, theta):
        return _prepare(theta)

    def chunk(self, Xb, prep):
        x = np.ascontiguousarray(Xb[:, self.cols])
        comps, log_prob, miss = _components(x, prep)
        return {"comps": comps, "miss": miss, "log_prob": log_prob, "prep": prep}

    def accumulate(self, c, resp, terms):
        s1, s2 = terms["s1"], terms["s2"]
        miss, prep = c["miss"], c["prep"]
        any_missing = miss.any()
        for j, comp in enumerate(c["comps"]):
            r = resp[:, j]
            Xc = comp.centred
            s1[j] += r @ Xc
            if self.dense:
                s2[j] += (Xc * r[:, None]).T @ Xc
                for rows, cols, L in comp.cond:
                    _add_conditional_covariance(s2[j], r[rows], cols, L)
            else:
                s2[j] += r @ (Xc * Xc)
                if any_missing:
                    s2[j] += (r @ miss) / prep.factor[j] ** 2

    def m_step(self, terms, nk, theta):
        stats = Stats(terms={"nk": nk, "s1": terms["s1"], "s2": terms["s2"]})
        new = self._gaussian(nk.size).params_from_stats(stats, theta.means)
        return dataclasses.replace(new, weights=np.ones(nk.size))

    def n_parameters(self, k):
        return self._gaussian(k).n_parameters(self.cols.size) - (k - 1)

    def to_unconstrained(self, theta):
        return gaussian_to_unconstrained(theta)

    def from_unconstrained(self, z, like):
        return gaussian_from_unconstrained(z, like, like.weights)

    def sample(self, theta, labels, rng):
        d = self.cols.size
        out = np.empty((labels.size, d))
        for j in range(theta.means.shape[0]):
            sel = labels == j
            cov = theta.covariances[j]
            L = np.linalg.cholesky(cov) if self.dense else np.diag(np.sqrt(cov))
            out[sel] = theta.means[j] + rng.standard_normal((int(sel.sum()), d)) @ L.T
        return out

    def expected(self, c, resp, theta):
        """Conditional expectation of every cell given the row's observed cells."""
        return sum(
            resp[:, j, None] * (comp.centred + theta.means[j]) for j, comp in enumerate(c["comps"])
        )

    def draw(self, c, labels, theta, u):
        """Missing cells drawn from the conditional normal of each row's drawn component,
        with standard normal variates from the uniforms ``u`` (one per cell)."""
        prep = c["prep"]
        out = np.empty((labels.size, self.cols.size))
        noise = standard_normal(u)
        for j, comp in enumerate(c["comps"]):
            sel = labels == j
            if not sel.any():
                continue
            value = comp.centred + theta.means[j]
            if self.dense:
                for rows, cols, L in comp.cond:
                    # x_m ~ N(conditional mean, P_mm⁻¹) with P_mm = L Lᵀ: x_m += L⁻ᵀ ε
                    eps = noise[rows[:, None], cols]
                    step = np.linalg.solve(np.swapaxes(L, 1, 2), eps[:, :, None])[:, :, 0]
                    value[rows[:, None], cols] += step
            else:
                value += noise / prep.factor[j]
            out[sel] = value[sel]
        return out


@dataclass(frozen=True)
class MixedParams:
    """Parameters of a mixed-type mixture.

    Attributes
    ----------
    weights : ndarray of shape (k,)
    gaussian : GaussianParams or None
        Means (k, d_g) and covariances ((k, d_g) diag or (k, d_g, d_g) full); its own
        ``weights`` are all one. ``None`` without Gaussian columns.
    binary : ndarray of shape (k, d_b)
        Probability of a 1 in each binary column.
    categorical : ndarray of shape (k, d_c, max_levels)
        Level probabilities of each categorical column, zero-padded.
    counts : ndarray of shape (k, d_p)
        Poisson rate of each count column.
    """

    weights: np.ndarray
    gaussian: GaussianParams | None
    binary: np.ndarray
    categorical: np.ndarray
    counts: np.ndarray


_THETA_FIELD = {
    "gaussian": "gaussian",
    "bernoulli": "binary",
    "categorical": "categorical",
    "poisson": "counts",
}


class MixedFamily(ProductMixtureFamily):
    """Mixture over a table of mixed column types.

    Parameters
    ----------
    n_components : int
    layout : dict of str to sequence of int
        Block column positions of each kind (keys from ``MIXED_KINDS``).
    n_levels : sequence of int
        Levels of each categorical column, in the order of ``layout['categorical']``.
    covariance_type : {'diag', 'full'}
        Covariance of the Gaussian columns within a component.
    reg_covar : float
        Added to the diagonal of the Gaussian covariances.
    alpha, fit_weights, missing
        As for :class:`~emdask.families.discrete.ProductMixtureFamily`.
    """

    name = "mixed"

    def __init__(
        self,
        n_components,
        layout,
        n_levels=(),
        *,
        covariance_type="diag",
        reg_covar=1e-6,
        **kwargs,
    ):
        unknown = set(layout) - set(MIXED_KINDS)
        if unknown:
            raise ValueError(f"unknown column kind(s) {sorted(unknown)}; use {list(MIXED_KINDS)}")
        self.layout = {kind: tuple(int(c) for c in layout.get(kind, ())) for kind in MIXED_KINDS}
        self.n_levels = tuple(int(L) for L in n_levels)
        if len(self.n_levels) != len(self.layout["categorical"]):
            raise ValueError("n_levels must give one number of levels per categorical column")
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        super().__init__(n_components, **kwargs)

    def _parts(self):
        parts = []
        lay = self.layout
        if lay["gaussian"]:
            parts.append(GaussianPart(lay["gaussian"], self.covariance_type, self.reg_covar))
        if lay["bernoulli"]:
            parts.append(BernoulliPart(lay["bernoulli"], self.alpha, self.missing))
        if lay["categorical"]:
            parts.append(
                CategoricalPart(lay["categorical"], self.n_levels, self.alpha, self.missing)
            )
        if lay["poisson"]:
            parts.append(PoissonPart(lay["poisson"], self.alpha, self.missing))
        if not parts:
            raise ValueError("a mixed model needs at least one column")
        return parts

    def _thetas(self, params):
        return [getattr(params, _THETA_FIELD[p.kind]) for p in self.parts]

    def _make(self, weights, thetas):
        k = self.n_components
        values = {kind: th for kind, th in zip((p.kind for p in self.parts), thetas)}
        lmax = max(self.n_levels, default=0)
        return MixedParams(
            weights=np.asarray(weights, dtype=np.float64),
            gaussian=values.get("gaussian"),
            binary=values.get("bernoulli", np.zeros((k, 0))),
            categorical=values.get("categorical", np.zeros((k, 0, lmax))),
            counts=values.get("poisson", np.zeros((k, 0))),
        )

    def make_params(self, weights, *, means=None, covariances=None, binary=None,
                    categorical=None, counts=None):
        """Parameters from their arrays (covariances checked positive definite)."""
        k = self.n_components
        gaussian = None
        if self.layout["gaussian"]:
            means = np.asarray(means, dtype=np.float64)
            covariances = np.asarray(covariances, dtype=np.float64)
            gaussian = GaussianParams(
                np.ones(k),
                means,
                covariances,
                compute_precision_cholesky(covariances, self.covariance_type),
                self.covariance_type,
            )
        thetas = {
            "gaussian": gaussian,
            "bernoulli": binary,
            "categorical": categorical,
            "poisson": counts,
        }
        return self._make(
            weights,
            [
                thetas[p.kind] if p.kind == "gaussian" else np.asarray(thetas[p.kind], dtype=np.float64)
                for p in self.parts
            ],
        )
