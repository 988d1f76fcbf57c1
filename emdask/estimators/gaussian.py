"""Gaussian mixture estimator with scikit-learn's arguments and attributes."""

from __future__ import annotations

import numbers
import operator

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from ..engine.driver import check_finite, map_reduce_many
from ..engine.kmeans import kmeans_parallel_many, kmeans_plusplus, sample_rows_many
from ..engine.randomness import row_uniforms, stream_rng
from ..families.gaussian import (
    COVARIANCE_TYPES,
    GaussianFamily,
    GaussianParams,
    compute_precision_cholesky,
    covariances_from_precisions,
    precisions_from_cholesky,
)
from . import state as rules
from .base import BaseMixture, _check_number

__all__ = ["GaussianMixture"]

INIT_METHODS = ("k-means||", "kmeans", "k-means++", "random_from_data", "random")

#: Rows drawn for the in-memory k-means++ seeding.
KMEANS_PLUSPLUS_SAMPLE = 20_000


def _assignment_chunk(block, index, family, centers):
    from ..engine.kmeans import nearest

    labels, _ = nearest(block, centers)
    informative = ~np.isnan(block).all(axis=1)
    return family.assignment_stats(block[informative], centers, labels[informative])


def _random_resp_chunk(block, index, family, shift, seed, starts):
    """Statistics of random responsibilities: each row's draws depend on the seed and its
    global position only, so the start is the same however the table is partitioned."""
    k = shift.shape[0]
    n = block.shape[0]
    u = row_uniforms(seed, "init_random", starts[index], n, width=k)
    informative = ~np.isnan(block).all(axis=1)
    resp = u[informative] + 1e-12  # never a row of zeros
    resp /= resp.sum(axis=1, keepdims=True)
    return family.responsibility_stats(block[informative], resp, shift)


class GaussianMixture(BaseMixture):
    """Gaussian mixture fitted by map-reduce EM over any Dask collection.

    Arguments and fitted attributes follow :class:`sklearn.mixture.GaussianMixture`; rows
    may have missing cells (NaN), which are handled exactly.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood per row.
    reg_covar : float, default=1e-6
        Non-negative regularization added to the diagonal of every covariance.
    max_iter : int, default=100
    n_init : int, default=1
        Restarts; they share each pass over the data, initialisation included (the
        restarts' k-means|| runs take the passes of one), and the best is kept.
    init_params : {'k-means||', 'kmeans', 'k-means++', 'random_from_data', 'random'}, default='k-means||'
        ``'k-means||'`` seeds with scalable k-means|| (a fixed number of passes, see
        :mod:`emdask.engine.kmeans`) and two Lloyd passes; ``'kmeans'`` adds eight more Lloyd
        passes; ``'k-means++'`` seeds on a uniform sample of 20,000 rows;
        ``'random_from_data'`` takes k random rows as means; ``'random'`` starts from random
        responsibilities. The initial weights and covariances come from one more pass.
    weights_init : array-like of shape (n_components,), optional
    means_init : array-like of shape (n_components, n_features), optional
    precisions_init : array-like, optional
        Shape by covariance type as ``precisions_``.
    random_state : int, RandomState or Generator, optional
        The same value gives the same model, whatever the number of workers.
    warm_start : bool, default=False
        Start ``fit`` from the previous solution (for data arriving in batches).
    verbose : int, default=0
        ``1`` prints a line every ``verbose_interval`` iterations and at the last one
        (iteration, mean log-likelihood, change, time); ``2`` prints every iteration.
    verbose_interval : int, default=10
        Iterations between two printed lines with ``verbose=1``.
    split_every : int, default=8
        Fan-in of the tree reduction of the statistics.
    persist : {'auto', True, False}, default='auto'
        Keep the converted data in memory between iterations (``'auto'``: when it fits in
        half of the workers' memory); otherwise every iteration re-reads the source.
    algorithm : {'em', 'squarem'}, default='squarem'
        ``'em'``: plain EM, one pass per iteration. ``'squarem'``: EM accelerated by SQUAREM
        (Varadhan & Roland 2008, scheme S3; :mod:`emdask.engine.squarem`): every pass is still
        one EM evaluation, but every third pass jumps along the direction of the last two EM
        steps (in unconstrained coordinates, so the jump is always a valid model) and is kept
        only if the log-likelihood does not decrease. Same fixed point as plain EM, usually
        far fewer passes when components overlap or many cells are missing; ``n_iter_`` counts
        passes and ``lower_bounds_`` the accepted points. The default, as it took fewer passes
        and less time in every case of ``benchmarks/acceleration.py``; ``'em'`` reproduces
        scikit-learn's iterations one for one.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_, precisions_, precisions_cholesky_ : ndarray
        Shapes by covariance type, as in scikit-learn.
    converged_ : bool
    n_iter_ : int
        EM passes (with ``'squarem'``, rejected extrapolations included).
    lower_bound_ : float
        Mean log-likelihood per row at the last iteration (accepted point).
    lower_bounds_ : list of float
        Mean log-likelihood at every iteration (every accepted point with ``'squarem'``).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when fitted on a frame.
    n_passes_ : int
        Passes over the data made by ``fit`` (summary, initialisation and EM).
    """

    _init_methods = INIT_METHODS
    _parameter_constraints: dict = {
        **BaseMixture._parameter_constraints,
        "covariance_type": [StrOptions(set(COVARIANCE_TYPES))],
        "reg_covar": [Interval(numbers.Real, 0.0, None, closed="left")],
        "init_params": [StrOptions(set(INIT_METHODS))],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "warm_start": ["boolean"],
    }
    _fitted_arrays = (
        "weights_",
        "means_",
        "covariances_",
        "precisions_cholesky_",
        "precisions_",
    )

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="k-means||",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        split_every=8,
        persist="auto",
        algorithm="squarem",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.split_every = split_every
        self.persist = persist
        self.algorithm = algorithm

    # -- checks ---------------------------------------------------------------------------

    def _check_parameters(self):
        super()._check_parameters()
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type={self.covariance_type!r} is not one of {list(COVARIANCE_TYPES)}"
            )
        _check_number("reg_covar", self.reg_covar, low=0.0)

    def _check_extra_parameters(self, n_features):
        k, d = self.n_components, n_features
        if self.weights_init is not None:
            w = np.asarray(self.weights_init, dtype=np.float64)
            if w.shape != (k,):
                raise ValueError(f"weights_init must have shape ({k},), got {w.shape}")
            if np.any(w < 0) or np.any(w > 1) or not np.isclose(w.sum(), 1.0):
                raise ValueError("weights_init must be in [0, 1] and sum to 1")
        if self.means_init is not None:
            m = np.asarray(self.means_init, dtype=np.float64)
            if m.shape != (k, d):
                raise ValueError(f"means_init must have shape ({k}, {d}), got {m.shape}")
        if self.precisions_init is not None:
            expected = {
                "full": (k, d, d),
                "tied": (d, d),
                "diag": (k, d),
                "spherical": (k,),
            }[self.covariance_type]
            p = np.asarray(self.precisions_init, dtype=np.float64)
            if p.shape != expected:
                raise ValueError(
                    f"precisions_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}, got {p.shape}"
                )
            mats = {"full": p, "tied": p[None]}.get(self.covariance_type)
            if mats is not None:
                if not np.allclose(mats, np.swapaxes(mats, 1, 2)):
                    raise ValueError("precisions_init must be symmetric")
                if np.any(np.linalg.eigvalsh(mats) <= 0):
                    raise ValueError("precisions_init must be positive definite")
            elif np.any(p <= 0):
                raise ValueError("precisions_init must be positive")

    # -- hooks ----------------------------------------------------------------------------

    def _make_family(self):
        return GaussianFamily(self.n_components, self.covariance_type, self.reg_covar)

    def _initialize(self, data, family, seed):
        return self._initialize_jobs(data, [(self, family, seed)])[0]

    @classmethod
    def _initialize_jobs(cls, data, jobs, context=None):
        """Starting parameters of several ``(estimator, family, seed)`` jobs in shared passes.

        Restarts and candidate numbers of components start together: one pass draws the
        uniform samples of every seed (``'random_from_data'``, ``'k-means++'`` and the first
        k-means|| centre), the k-means|| rounds of all jobs with a seed share one candidate
        set (oversampled for the largest ``n_components``) and each pass, their Lloyd steps
        share each pass, and one last pass computes every job's initial weights and
        covariances. Passes for k-means|| jobs: ``1 + 5 + 1 + n_lloyd + 1`` (``n_lloyd``: 2,
        or 10 for ``'kmeans'``) whatever the number of jobs; a job gets the same start
        alone as among others, except that k-means|| candidates are drawn for the largest
        ``n_components`` sharing its seed. A single component needs no seeding: it starts
        from the column means and the covariance about them (the last pass only).
        """
        shift = data.summary.col_mean
        sizes = {}  # rows to sample per seed
        kinds = []
        for est, _, seed in jobs:
            k = est.n_components
            given = (est.weights_init, est.means_init, est.precisions_init)
            if all(v is not None for v in given):
                kind = "given"
            elif est.means_init is not None:
                kind = "means"
            elif est.init_params in ("random", "random_from_data"):
                kind = est.init_params
            elif est.init_params == "k-means++":
                kind = "k-means++"
            else:
                kind = "k-means||"
            if k == 1 and kind in ("random_from_data", "k-means++", "k-means||"):
                kind = "single"  # one component: every seeding gives the column means
            need = {
                "random_from_data": k,
                "k-means++": max(KMEANS_PLUSPLUS_SAMPLE, 10 * k),
                "k-means||": 1,
            }.get(kind)
            if need is not None:
                sizes[seed] = max(sizes.get(seed, 0), need)
            kinds.append(kind)
        samples = sample_rows_many(data, sizes) if sizes else {}
        km = [j for j, kind in enumerate(kinds) if kind == "k-means||"]
        km_centers = kmeans_parallel_many(
            data,
            [
                (jobs[j][0].n_components, jobs[j][2], 2 if jobs[j][0].init_params == "k-means||" else 10)
                for j in km
            ],
            first_rows=samples,
        )
        centers = dict(zip(km, km_centers))
        tasks, owners = [], []
        for j, ((est, family, seed), kind) in enumerate(zip(jobs, kinds)):
            k = est.n_components
            if kind == "given":
                continue
            if kind == "means":
                centers[j] = np.asarray(est.means_init, dtype=np.float64)
            elif kind == "single":
                centers[j] = shift[None, :]
            elif kind == "random_from_data":
                centers[j] = samples[seed][:k]
            elif kind == "k-means++":
                sample = samples[seed][: max(KMEANS_PLUSPLUS_SAMPLE, 10 * k)]
                centers[j] = kmeans_plusplus(sample, k, stream_rng(seed, "kmeans_plusplus"))
            if kind == "random":
                base = np.tile(shift, (k, 1))
                centers[j] = base
                tasks.append(
                    (_random_resp_chunk, (family, base, seed, data.row_starts), operator.add)
                )
            else:
                tasks.append((_assignment_chunk, (family, centers[j]), operator.add))
            owners.append(j)
        stats = dict(zip(owners, map_reduce_many(data, tasks)))
        return [
            est._start_from(family, stats.get(j), centers.get(j))
            for j, (est, family, _) in enumerate(jobs)
        ]

    def _start_from(self, family, stats, centers):
        """Initial parameters from the statistics of the first assignment (``None`` when the
        user gave weights, means and precisions), then the user's ``*_init`` values."""
        if stats is None:
            precisions = np.asarray(self.precisions_init, dtype=np.float64)
            cov = covariances_from_precisions(precisions, self.covariance_type)
            return family.make_params(self.weights_init, self.means_init, cov)
        try:
            params = family.params_from_stats(stats, centers)
        except ValueError:  # a start so far from the data that its statistics overflow
            check_finite(stats, k=self.n_components, what="starting statistic")
            raise
        weights, means, cov = params.weights, params.means, params.covariances
        if self.weights_init is not None:
            weights = np.asarray(self.weights_init, dtype=np.float64)
        if self.means_init is not None:
            means = np.asarray(self.means_init, dtype=np.float64)
        if self.precisions_init is not None:
            cov = covariances_from_precisions(
                np.asarray(self.precisions_init, dtype=np.float64), self.covariance_type
            )
        return family.make_params(weights, means, cov)

    def _array_rules(self, k, d, meta):
        ct = self.covariance_type
        cov = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[ct]
        why = f"n_components={k}, n_features_in_={d} and covariance_type={ct!r}"
        return {
            "weights_": ((k,), f"n_components={k}", rules.weights_problem),
            "means_": ((k, d), f"n_components={k} and n_features_in_={d}", None),
            "covariances_": (cov, why, rules.covariances_problem(ct)),
            "precisions_cholesky_": (cov, why, rules.precisions_cholesky_problem(ct)),
            "precisions_": (cov, why, rules.precisions_problem(ct)),
        }

    def _set_fitted(self, params):
        self.weights_ = params.weights
        self.means_ = params.means
        self.covariances_ = params.covariances
        self.precisions_cholesky_ = params.precisions_cholesky
        self.precisions_ = precisions_from_cholesky(params.precisions_cholesky, self.covariance_type)

    def _fitted_params(self):
        return GaussianParams(
            np.asarray(self.weights_),
            np.asarray(self.means_),
            np.asarray(self.covariances_),
            compute_precision_cholesky(np.asarray(self.covariances_), self.covariance_type)
            if not hasattr(self, "precisions_cholesky_")
            else np.asarray(self.precisions_cholesky_),
            self.covariance_type,
        )
