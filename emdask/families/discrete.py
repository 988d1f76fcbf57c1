"""Discrete families: Bernoulli, binomial, categorical and Poisson mixtures.

Every model here is a *product* mixture: given the component, the columns are independent,
so a row's log-likelihood under component ``k`` is ``log w_k`` plus a sum of per-column terms.
A missing cell (NaN) is marginalized by leaving its term out of the sum, which is exact under
missing-at-random. The code is organised around *parts*: a part owns a group of columns of one
kind and knows how to compute their log-probabilities, add their sufficient statistics and run
their closed-form M-step. A family is a list of parts plus the mixing weights, so the
mixed-type family (:mod:`emdask.families.mixed`) is just a longer list.

=============== ==================================== =====================================
family          parameters (besides ``weights`` (k,)) statistics (``terms``)
=============== ==================================== =====================================
Bernoulli       ``probabilities`` (k, d)              ones (k, d), seen (k, d)
binomial        ``probabilities`` (k,)                successes (k,), trials (k,)
categorical     ``probabilities`` (k, d, max_levels)  counts (levels + d, k)
Poisson         ``rates`` (k, d)                      total (k, d), seen (k, d)
=============== ==================================== =====================================

Smoothing: ``alpha`` is a pseudo-count added in the M-step (a Dirichlet / Beta prior:
``p = (count + alpha) / (total + levels * alpha)``; for Poisson rates, ``alpha`` pseudo-rows
with one event each: ``rate = (sum + alpha) / (rows + alpha)``). ``alpha = 0`` gives the
maximum-likelihood estimate. Log-probabilities are floored at ``log(tiny)`` (about -708), so a
probability of exactly 0 never produces ``0 * -inf``.

Missing cells: with ``missing='marginalize'`` (default) the cell is left out; with
``missing='expected'`` it is treated as a hidden variable whose expected value the E-step adds
to the statistics (the textbook formulation: same fixed point, slower convergence). Rows with
no observed cell then still count, through their expected values.

Categorical blocks carry integer codes ``0 .. levels-1`` (as float64, NaN for a missing cell);
:mod:`emdask.engine.encoding` turns labels into codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import gammaln

from . import _kernels
from .base import (
    ROW_CHUNK,
    Stats,
    draw_labels,
    floored_log,
    from_log_ratios,
    from_logits,
    log_ratios,
    logits,
    normalize_log_rows,
    poisson_from_uniforms,
)

__all__ = [
    "BernoulliFamily",
    "BernoulliParams",
    "BinomialFamily",
    "BinomialParams",
    "CategoricalFamily",
    "CategoricalParams",
    "PoissonFamily",
    "PoissonParams",
    "MISSING_MODES",
    "ProductMixtureFamily",
    "safe_log",
]

EPS = np.finfo(np.float64).eps
#: Floor of every log-probability: ``log`` of the smallest positive normal float64.
LOG_FLOOR = float(np.log(np.finfo(np.float64).tiny))
MISSING_MODES = ("marginalize", "expected")
#: Up to this many one-hot columns a chunk's indicator matrix is dense (BLAS), else sparse.
DENSE_ONE_HOT_MAX = 256


def safe_log(p):
    """``log(p)`` floored at ``log(tiny)``; ``log(0)`` gives about -708, never ``-inf``."""
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(p), LOG_FLOOR)


def _chunks(n):
    for start in range(0, n, ROW_CHUNK):
        yield slice(start, min(start + ROW_CHUNK, n))


def _ratio(num, den, previous):
    """``num / den`` where ``den > 0``, else the previous value (a component with no mass)."""
    ok = den > 0
    out = np.where(ok, num / np.where(ok, den, 1.0), previous)
    return out


# --------------------------------------------------------------------------------------
# Parts: one kind of column each
# --------------------------------------------------------------------------------------


class BernoulliPart:
    """Binary columns (0/1), one success probability per component and column.

    ``theta``: probabilities of shape (k, d).
    """

    kind = "bernoulli"

    def __init__(self, cols, alpha=0.0, missing="marginalize"):
        self.cols = np.asarray(cols, dtype=np.intp)
        self.alpha = float(alpha)
        self.missing = missing

    def zero_terms(self, k):
        d = self.cols.size
        return {"ones": np.zeros((k, d)), "seen": np.zeros((k, d))}

    def prepare(self, theta):
        return safe_log(theta), safe_log(1.0 - theta)

    def chunk(self, Xb, prep):
        x = Xb[:, self.cols]
        obs = ~np.isnan(x)
        ones = np.where(obs, x, 0.0)
        seen = obs.astype(np.float64)
        log_p, log_q = prep
        log_prob = ones @ log_p.T + (seen - ones) @ log_q.T
        return {"ones": ones, "seen": seen, "miss": ~obs, "log_prob": log_prob}

    def accumulate(self, c, resp, terms):
        terms["ones"] += resp.T @ c["ones"]
        terms["seen"] += resp.T @ c["seen"]

    def m_step(self, terms, nk, theta):
        num, den = terms["ones"], terms["seen"]
        if self.missing == "expected":
            num = num + (nk[:, None] - den) * theta
            den = np.broadcast_to(nk[:, None], den.shape)
        return _ratio(num + self.alpha, den + 2.0 * self.alpha, theta)

    def n_parameters(self, k):
        return k * self.cols.size

    def to_unconstrained(self, theta):
        return logits(theta).ravel()

    def from_unconstrained(self, z, like):
        return from_logits(z).reshape(like.shape)

    def sample(self, theta, labels, rng):
        return self.draw(None, labels, theta, rng.random((labels.size, self.cols.size)))

    def expected(self, c, resp, theta):
        """Most probable value (0 or 1) of every cell given the row's observed cells."""
        return (resp @ theta >= 0.5).astype(np.float64)

    def draw(self, c, labels, theta, u):
        """Cells drawn from each row's component by the uniforms ``u`` (one per cell)."""
        return (u < theta[labels]).astype(np.float64)


class BinomialPart:
    """Successes out of a number of trials, one success probability per component.

    Columns: ``(successes, trials)``, or ``(successes,)`` with a fixed ``n_trials``.
    ``theta``: probabilities of shape (k,). A row missing either value carries no
    information.
    """

    kind = "binomial"

    def __init__(self, cols, n_trials=None, alpha=0.0):
        self.cols = np.asarray(cols, dtype=np.intp)
        expected = 1 if n_trials is not None else 2
        if self.cols.size != expected:
            raise ValueError(
                "a binomial part needs a successes column and a trials column, or one "
                "successes column and a fixed n_trials"
            )
        self.n_trials = None if n_trials is None else float(n_trials)
        self.alpha = float(alpha)

    def zero_terms(self, k):
        return {"successes": np.zeros(k), "trials": np.zeros(k)}

    def prepare(self, theta):
        return safe_log(theta), safe_log(1.0 - theta)

    def chunk(self, Xb, prep):
        s = Xb[:, self.cols[0]]
        n = Xb[:, self.cols[1]] if self.n_trials is None else np.full(s.shape, self.n_trials)
        obs = ~(np.isnan(s) | np.isnan(n))
        s = np.where(obs, s, 0.0)
        n = np.where(obs, n, 0.0)
        log_choose = gammaln(n + 1.0) - gammaln(s + 1.0) - gammaln(n - s + 1.0)
        log_p, log_q = prep
        log_prob = s[:, None] * log_p[None, :] + (n - s)[:, None] * log_q[None, :]
        log_prob += log_choose[:, None]
        miss = np.column_stack([~obs] * self.cols.size)
        return {"s": s, "n": n, "miss": miss, "log_prob": log_prob}

    def accumulate(self, c, resp, terms):
        terms["successes"] += c["s"] @ resp
        terms["trials"] += c["n"] @ resp

    def m_step(self, terms, nk, theta):
        return _ratio(
            terms["successes"] + self.alpha, terms["trials"] + 2.0 * self.alpha, theta
        )

    def to_unconstrained(self, theta):
        return logits(theta).ravel()

    def from_unconstrained(self, z, like):
        return from_logits(z).reshape(like.shape)

    def n_parameters(self, k):
        return k

    def sample(self, theta, labels, rng, trials=None):
        n = np.full(labels.size, self.n_trials) if trials is None else trials
        s = rng.binomial(n.astype(np.int64), theta[labels]).astype(np.float64)
        if self.n_trials is None:
            return np.column_stack([s, n.astype(np.float64)])
        return s[:, None]


class _CategoricalScratch:
    """A categorical part's log-probability table, with work buffers reused by every chunk
    of one pass (a pass is one thread's: the buffers are never shared between threads).

    Allocating a fresh indicator matrix per chunk costs page faults on every chunk where
    the allocator hands large blocks back to the system at once (as Dask workers configure
    it); reusing buffers keeps the kernel's cost the same everywhere.
    """

    def __init__(self, table, part):
        self.table = table
        self.offsets = part.offsets.astype(np.float64)
        self.missing_slot = part.n_levels.astype(np.float64)
        self.n_slots = part.n_slots
        self.row_base = (np.arange(ROW_CHUNK) * part.n_slots)[:, None]
        self._buffers = {}

    def buffer(self, name, shape, dtype):
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < shape[0]:
            rows = max(shape[0], ROW_CHUNK)
            buf = self._buffers[name] = np.empty((rows,) + shape[1:], dtype=dtype)
        return buf[: shape[0]]


class CategoricalPart:
    """Categorical columns given as integer codes, one distribution per component and column.

    ``theta``: probabilities of shape (k, d, max_levels), zero beyond a column's levels.
    The E-step turns each chunk into a one-hot indicator matrix with one extra slot per column
    for a missing cell (log-probability 0), so log-probabilities and counts are two matrix
    products.
    """

    kind = "categorical"

    def __init__(self, cols, n_levels, alpha=0.0, missing="marginalize"):
        self.cols = np.asarray(cols, dtype=np.intp)
        self.n_levels = np.asarray(n_levels, dtype=np.intp)
        if self.n_levels.shape != self.cols.shape:
            raise ValueError("n_levels must give one number of levels per categorical column")
        if np.any(self.n_levels < 1):
            raise ValueError("every categorical column needs at least one level")
        self.alpha = float(alpha)
        self.missing = missing
        slots = self.n_levels + 1  # the last slot of each column is "missing"
        self.offsets = np.concatenate([[0], np.cumsum(slots)[:-1]]).astype(np.intp)
        self.n_slots = int(slots.sum())
        self.max_levels = int(self.n_levels.max()) if self.n_levels.size else 0

    def zero_terms(self, k):
        return {"counts": np.zeros((self.n_slots, k))}

    def prepare(self, theta):
        k = theta.shape[0]
        table = np.zeros((self.n_slots, k))
        for j, (off, L) in enumerate(zip(self.offsets, self.n_levels)):
            table[off : off + L] = safe_log(theta[:, j, :L]).T
        return _CategoricalScratch(table, self)

    def _codes(self, Xb):
        c = self.cols
        if c.size and np.array_equal(c, np.arange(c[0], c[0] + c.size)):
            return Xb[:, c[0] : c[0] + c.size]  # a view: no copy of the chunk
        return Xb[:, c]

    def _indicators(self, Xb, prep):
        codes = self._codes(Xb)
        miss = np.isnan(codes)
        n, d = codes.shape
        # slot of every cell: offset + code, or offset + levels for a missing cell; computed
        # in buffers reused from chunk to chunk (no large allocation per chunk)
        slot = prep.buffer("slot", (n, d), np.float64)
        np.copyto(slot, codes)
        np.copyto(slot, prep.missing_slot, where=miss)
        slot += prep.offsets
        if self.n_slots <= DENSE_ONE_HOT_MAX:
            flat = prep.buffer("flat", (n, d), np.intp)
            np.copyto(flat, slot, casting="unsafe")
            if n > prep.row_base.shape[0]:
                prep.row_base = (np.arange(n) * self.n_slots)[:, None]
            flat += prep.row_base[:n]
            onehot = prep.buffer("onehot", (n, self.n_slots), np.float64)
            onehot.fill(0.0)
            onehot.reshape(-1)[flat.reshape(-1)] = 1.0
        else:
            onehot = sparse.csr_matrix(
                (np.ones(n * d), slot.astype(np.intp).ravel(), np.arange(0, n * d + 1, d)),
                shape=(n, self.n_slots),
            )
        return onehot, miss

    def chunk(self, Xb, prep):
        onehot, miss = self._indicators(Xb, prep)
        return {"onehot": onehot, "miss": miss, "log_prob": np.asarray(onehot @ prep.table)}

    def accumulate(self, c, resp, terms):
        terms["counts"] += np.asarray(c["onehot"].T @ resp)

    def m_step(self, terms, nk, theta):
        counts = terms["counts"]
        new = np.zeros_like(theta)
        for j, (off, L) in enumerate(zip(self.offsets, self.n_levels)):
            num = counts[off : off + L].T  # (k, L)
            if self.missing == "expected":
                num = num + counts[off + L][:, None] * theta[:, j, :L]
            num = num + self.alpha
            den = num.sum(axis=1, keepdims=True)
            new[:, j, :L] = _ratio(num, den, theta[:, j, :L])
        return new

    def to_unconstrained(self, theta):
        return np.concatenate(
            [log_ratios(theta[:, j, :L]).ravel() for j, L in enumerate(self.n_levels)]
        )

    def from_unconstrained(self, z, like):
        k = like.shape[0]
        theta = np.zeros(like.shape)
        ends = np.cumsum(k * self.n_levels)
        for j, (L, chunk) in enumerate(zip(self.n_levels, np.split(z, ends[:-1]))):
            theta[:, j, :L] = from_log_ratios(chunk.reshape(k, L))
        return theta

    def n_parameters(self, k):
        return int(k * (self.n_levels - 1).sum())

    def sample(self, theta, labels, rng):
        return self.draw(None, labels, theta, rng.random((labels.size, self.cols.size)))

    def draw(self, c, labels, theta, u):
        """Levels drawn from each row's component by the uniforms ``u`` (one per cell)."""
        out = np.empty((labels.size, self.cols.size))
        for j, L in enumerate(self.n_levels):
            cdf = np.cumsum(theta[labels, j, :L], axis=1)
            out[:, j] = np.minimum((cdf < u[:, j, None] * cdf[:, -1:]).sum(axis=1), L - 1)
        return out

    def level_probabilities(self, resp, theta, j):
        """``P(x_j = level | row's observed cells)``, shape (n, levels_j)."""
        return resp @ theta[:, j, : self.n_levels[j]]

    def expected(self, c, resp, theta):
        """Most probable level of every cell given the row's observed cells."""
        out = np.empty((resp.shape[0], self.cols.size))
        for j in range(self.cols.size):
            out[:, j] = self.level_probabilities(resp, theta, j).argmax(axis=1)
        return out


class PoissonPart:
    """Count columns, one rate per component and column.

    ``theta``: rates of shape (k, d).
    """

    kind = "poisson"

    def __init__(self, cols, alpha=0.0, missing="marginalize"):
        self.cols = np.asarray(cols, dtype=np.intp)
        self.alpha = float(alpha)
        self.missing = missing

    def zero_terms(self, k):
        d = self.cols.size
        return {"total": np.zeros((k, d)), "seen": np.zeros((k, d))}

    def prepare(self, theta):
        return safe_log(theta), theta

    def chunk(self, Xb, prep):
        x = Xb[:, self.cols]
        obs = ~np.isnan(x)
        x0 = np.where(obs, x, 0.0)
        seen = obs.astype(np.float64)
        log_rate, rate = prep
        log_prob = x0 @ log_rate.T - seen @ rate.T - gammaln(x0 + 1.0).sum(axis=1)[:, None]
        return {"x": x0, "seen": seen, "miss": ~obs, "log_prob": log_prob}

    def accumulate(self, c, resp, terms):
        terms["total"] += resp.T @ c["x"]
        terms["seen"] += resp.T @ c["seen"]

    def m_step(self, terms, nk, theta):
        num, den = terms["total"], terms["seen"]
        if self.missing == "expected":
            num = num + (nk[:, None] - den) * theta
            den = np.broadcast_to(nk[:, None], den.shape)
        return _ratio(num + self.alpha, den + self.alpha, theta)

    def to_unconstrained(self, theta):
        return floored_log(theta).ravel()

    def from_unconstrained(self, z, like):
        with np.errstate(under="ignore"):
            return np.exp(z).reshape(like.shape)

    def n_parameters(self, k):
        return k * self.cols.size

    def sample(self, theta, labels, rng):
        return rng.poisson(theta[labels]).astype(np.float64)

    def expected(self, c, resp, theta):
        """Conditional expectation of every cell given the row's observed cells."""
        return resp @ theta

    def draw(self, c, labels, theta, u):
        """Missing counts drawn from each row's component by inversion of the uniforms ``u``
        (other cells 0: inversion costs more than a product, so only missing cells pay it)."""
        miss = c["miss"]
        out = np.zeros(miss.shape)
        out[miss] = poisson_from_uniforms(u[miss], theta[labels][miss])
        return out


# --------------------------------------------------------------------------------------
# The product mixture: weights and a list of parts
# --------------------------------------------------------------------------------------


class ProductMixtureFamily:
    """Shared E-step, M-step and per-row methods of the product-form mixtures.

    Subclasses define ``_parts()`` (the list of parts), ``_thetas(params)`` (one parameter
    array per part) and ``_make(weights, thetas)`` (parameters from them).

    Parameters
    ----------
    n_components : int
    alpha : float
        Pseudo-count added in the M-step (0: maximum likelihood).
    fit_weights : bool
        ``False`` holds the mixing weights at their initial values.
    missing : {'marginalize', 'expected'}
        How the E-step treats a missing cell (see the module docstring).
    """

    name = "product"

    def __init__(self, n_components, *, alpha=0.0, fit_weights=True, missing="marginalize"):
        if missing not in MISSING_MODES:
            raise ValueError(f"missing={missing!r} is not one of {list(MISSING_MODES)}")
        if alpha < 0:
            raise ValueError(f"alpha={alpha!r} must be >= 0")
        self.n_components = int(n_components)
        self.alpha = float(alpha)
        self.fit_weights = bool(fit_weights)
        self.missing = missing
        self.parts = self._parts()

    def __repr__(self):
        return (
            f"{type(self).__name__}(n_components={self.n_components}, alpha={self.alpha}, "
            f"fit_weights={self.fit_weights}, missing={self.missing!r})"
        )

    # -- hooks ------------------------------------------------------------------------------

    def _parts(self):
        raise NotImplementedError

    def _thetas(self, params):
        raise NotImplementedError

    def _make(self, weights, thetas):
        raise NotImplementedError

    # -- parameters ---------------------------------------------------------------------------

    def n_parameters(self, n_features=None):
        """Number of free parameters (for BIC/AIC)."""
        k = self.n_components
        free_weights = k - 1 if self.fit_weights else 0
        return int(sum(p.n_parameters(k) for p in self.parts) + free_weights)

    # -- unconstrained coordinates (accelerated EM) -------------------------------------------

    def to_unconstrained(self, params):
        """Flat vector of log-ratio weights (when fitted) and every part's unconstrained
        parameters (logits, log-ratios, logs); every vector maps back to valid parameters."""
        pieces = [log_ratios(params.weights)] if self.fit_weights else []
        pieces += [p.to_unconstrained(t) for p, t in zip(self.parts, self._thetas(params))]
        return np.concatenate(pieces)

    def from_unconstrained(self, z, like):
        """Parameters from ``to_unconstrained``'s vector (shapes, and the weights when they
        are held fixed, taken from ``like``)."""
        k = self.n_components
        if self.fit_weights:
            weights, z = from_log_ratios(z[:k]), z[k:]
        else:
            weights = like.weights
        thetas = []
        for part, theta in zip(self.parts, self._thetas(like)):
            n = part.to_unconstrained(theta).size
            thetas.append(part.from_unconstrained(z[:n], theta))
            z = z[n:]
        return self._make(weights, thetas)

    # -- E-step -----------------------------------------------------------------------------

    def _prepared(self, params):
        return [p.prepare(t) for p, t in zip(self.parts, self._thetas(params))]

    def _chunk(self, Xb, log_w, prepared):
        chunks = [p.chunk(Xb, prep) for p, prep in zip(self.parts, prepared)]
        log_prob = np.broadcast_to(log_w, (Xb.shape[0], log_w.size)).copy()
        for c in chunks:
            log_prob += c["log_prob"]
        return chunks, log_prob

    def partial_stats(self, X, params, weights=None):
        """E-step statistics of one block.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features), float64, NaN for a missing cell
        params : the family's parameters
        weights : ndarray of shape (n_rows,), optional
            Row weights (bootstrap replicates); ``None`` means one per row.

        Returns
        -------
        Stats
            ``terms``: ``nk`` (k,), the responsibility mass of each component, and each
            part's statistics (see the module docstring). Rows with no observed cell count
            only with ``missing='expected'``; they never count in ``n_rows`` or ``loglik``.
        """
        fast = self._compiled_stats(X, params, weights)
        if fast is not None:
            return fast
        k = self.n_components
        terms = {"nk": np.zeros(k)}
        for p in self.parts:
            terms.update({f"{p.kind}.{key}": v for key, v in p.zero_terms(k).items()})
        part_terms = [
            {key: terms[f"{p.kind}.{key}"] for key in p.zero_terms(0)} for p in self.parts
        ]
        log_w = safe_log(params.weights)
        prepared = self._prepared(params)
        n_rows = 0.0
        loglik = 0.0
        for sl in _chunks(X.shape[0]):
            Xb = X[sl]
            chunks, log_prob = self._chunk(Xb, log_w, prepared)
            resp, log_norm = normalize_log_rows(log_prob)
            informative = ~np.logical_and.reduce([c["miss"].all(axis=1) for c in chunks])
            row_w = informative.astype(np.float64)
            if weights is not None:
                row_w *= weights[sl]
            n_rows += row_w.sum()
            loglik += row_w @ np.where(row_w > 0, log_norm, 0.0)
            if self.missing == "expected":
                row_w = np.ones(Xb.shape[0]) if weights is None else weights[sl]
            resp *= row_w[:, None]
            terms["nk"] += resp.sum(axis=0)
            for part, c, t in zip(self.parts, chunks, part_terms):
                part.accumulate(c, resp, t)
        return Stats(n_rows, loglik, terms)

    def _compiled_stats(self, X, params, weights):
        """:meth:`partial_stats` of a family of categorical columns alone, in one compiled
        call per block (``None`` where that does not apply: other parts, or the compiled
        kernels turned off)."""
        if len(self.parts) != 1 or not isinstance(self.parts[0], CategoricalPart):
            return None
        compiled = _kernels.compiled_discrete()
        if compiled is None:
            return None
        part = self.parts[0]
        k = self.n_components
        table = np.ascontiguousarray(part.prepare(self._thetas(params)[0]).table)
        X = np.asarray(X, dtype=np.float64)
        if not (X.flags.c_contiguous or X.flags.f_contiguous):
            X = np.ascontiguousarray(X)
        column_major = not X.flags.c_contiguous
        w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
        counts = np.zeros((part.n_slots, k))
        nk = np.zeros(k)
        loglik, n_rows, bad = compiled.categorical_block_stats(
            X.T if column_major else X, column_major, part.cols.astype(np.int64),
            part.offsets.astype(np.int64), part.n_levels.astype(np.int64), table,
            np.ascontiguousarray(safe_log(params.weights)), w, self.missing == "expected",
            counts, nk,
        )
        if bad >= 0:
            row = X[bad, part.cols]
            raise ValueError(
                f"row {bad} of a block holds {row.tolist()}: categorical columns must hold "
                f"the level codes 0 .. n_levels - 1 (n_levels={part.n_levels.tolist()}) or "
                "NaN; encode the table with the estimator (pass it as it is) instead"
            )
        return Stats(n_rows, loglik, {"nk": nk, "categorical.counts": counts})

    # -- M-step -------------------------------------------------------------------------------

    def m_step(self, stats, params):
        """Closed-form M-step: new parameters from the summed statistics."""
        t = stats.terms
        nk = t["nk"]
        thetas = []
        for part, theta in zip(self.parts, self._thetas(params)):
            prefix = f"{part.kind}."
            own = {key[len(prefix) :]: v for key, v in t.items() if key.startswith(prefix)}
            thetas.append(part.m_step(own, nk, theta))
        if self.fit_weights:
            mass = nk + 10 * EPS
            weights = mass / mass.sum()
        else:
            weights = params.weights
        return self._make(weights, thetas)

    # -- per-row quantities -----------------------------------------------------------------

    def weighted_log_prob(self, X, params):
        """``log w_k + log p(x_o | k)`` for every row and component, shape (n_rows, k)."""
        log_w = safe_log(params.weights)
        prepared = self._prepared(params)
        out = np.empty((X.shape[0], self.n_components))
        for sl in _chunks(X.shape[0]):
            out[sl] = self._chunk(X[sl], log_w, prepared)[1]
        return out

    def _fill(self, X, params, filler):
        """``X`` with its missing cells filled: for every chunk of rows ``sl`` with a
        missing cell, ``filler(sl, resp)`` gives ``fill(part, c, theta)``, the values of
        the part's cells."""
        log_w = safe_log(params.weights)
        prepared = self._prepared(params)
        thetas = self._thetas(params)
        out = np.array(X, dtype=np.float64, copy=True)
        for sl in _chunks(X.shape[0]):
            Xb = out[sl]
            if not np.isnan(Xb).any():
                continue
            chunks, log_prob = self._chunk(Xb, log_w, prepared)
            resp, _ = normalize_log_rows(log_prob)
            fill_part = filler(sl, resp)
            for part, c, theta in zip(self.parts, chunks, thetas):
                if not c["miss"].any():
                    continue
                fill = fill_part(part, c, theta)
                view = Xb[:, part.cols]
                view[c["miss"]] = fill[c["miss"]]
                Xb[:, part.cols] = view
        return out

    def impute(self, X, params):
        """Rows with every missing cell filled from the observed cells of its row.

        Counts and continuous values get their conditional expectation; binary and
        categorical cells their most probable value. Observed cells are returned unchanged.
        """
        return self._fill(
            X, params, lambda sl, resp: lambda part, c, theta: part.expected(c, resp, theta)
        )

    def sample_missing(self, X, params, uniforms):
        """Rows with every missing cell drawn from its conditional distribution: a component
        from the row's posterior, then the missing cells from that component.

        ``uniforms(rows)`` gives the uniform [0, 1) draws of the block rows ``rows`` (a
        slice), shape ``(n, 1 + n_features)``: column 0 picks the row's component (one for
        all its cells), column ``1 + j`` draws cell ``j`` by inversion. A row's draws then
        depend on its own uniforms only.
        """

        def filler(sl, resp):
            u = uniforms(sl)
            labels = draw_labels(resp, u[:, 0])
            return lambda part, c, theta: part.draw(c, labels, theta, u[:, 1 + part.cols])

        return self._fill(X, params, filler)

    def sample(self, params, n_samples, rng):
        """Draw ``n_samples`` rows; returns ``(X, labels)``, rows grouped by component."""
        counts = rng.multinomial(n_samples, params.weights / params.weights.sum())
        labels = np.repeat(np.arange(self.n_components), counts)
        width = max(int(p.cols.max()) + 1 for p in self.parts)
        X = np.empty((n_samples, width))
        for part, theta in zip(self.parts, self._thetas(params)):
            X[:, part.cols] = part.sample(theta, labels, rng)
        return X, labels


# --------------------------------------------------------------------------------------
# The four discrete families
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BernoulliParams:
    """Weights (k,) and success probabilities (k, d)."""

    weights: np.ndarray
    probabilities: np.ndarray


class BernoulliFamily(ProductMixtureFamily):
    """Mixture of products of Bernoulli distributions over ``n_features`` binary columns."""

    name = "bernoulli"

    def __init__(self, n_components, n_features, **kwargs):
        self.n_features = int(n_features)
        super().__init__(n_components, **kwargs)

    def _parts(self):
        return [BernoulliPart(np.arange(self.n_features), self.alpha, self.missing)]

    def _thetas(self, params):
        return [params.probabilities]

    def _make(self, weights, thetas):
        return BernoulliParams(np.asarray(weights, dtype=np.float64), thetas[0])

    def make_params(self, weights, probabilities):
        return self._make(weights, [np.asarray(probabilities, dtype=np.float64)])


@dataclass(frozen=True)
class BinomialParams:
    """Weights (k,) and success probabilities (k,)."""

    weights: np.ndarray
    probabilities: np.ndarray


class BinomialFamily(ProductMixtureFamily):
    """Mixture of binomial distributions.

    A block has two columns, successes and trials, or one column of successes when
    ``n_trials`` is fixed.
    """

    name = "binomial"

    def __init__(self, n_components, n_trials=None, **kwargs):
        self.n_trials = n_trials
        super().__init__(n_components, **kwargs)
        if self.missing != "marginalize":
            raise ValueError("the binomial family supports only missing='marginalize'")

    def _parts(self):
        cols = [0] if self.n_trials is not None else [0, 1]
        return [BinomialPart(cols, self.n_trials, self.alpha)]

    def _thetas(self, params):
        return [params.probabilities]

    def _make(self, weights, thetas):
        return BinomialParams(np.asarray(weights, dtype=np.float64), thetas[0])

    def make_params(self, weights, probabilities):
        return self._make(weights, [np.asarray(probabilities, dtype=np.float64)])

    def sample(self, params, n_samples, rng, trials=None):
        """Draw ``n_samples`` rows (successes[, trials]); returns ``(X, labels)``.

        Without a fixed ``n_trials`` the trials of every row must be given (``trials``).
        """
        if self.n_trials is None and trials is None:
            raise ValueError("without a fixed n_trials, pass the trials of every row to draw")
        counts = rng.multinomial(n_samples, params.weights / params.weights.sum())
        labels = np.repeat(np.arange(self.n_components), counts)
        t = None if trials is None else np.asarray(trials, dtype=np.float64)
        return self.parts[0].sample(params.probabilities, labels, rng, t), labels


@dataclass(frozen=True)
class CategoricalParams:
    """Weights (k,) and level probabilities (k, d, max_levels), zero-padded."""

    weights: np.ndarray
    probabilities: np.ndarray


class CategoricalFamily(ProductMixtureFamily):
    """Latent class model: a mixture of products of categorical distributions.

    Parameters
    ----------
    n_components : int
    n_levels : sequence of int
        Number of levels of each column; a block holds codes ``0 .. n_levels[j] - 1``.
    """

    name = "categorical"

    def __init__(self, n_components, n_levels, **kwargs):
        self.n_levels = tuple(int(L) for L in n_levels)
        super().__init__(n_components, **kwargs)

    def _parts(self):
        return [
            CategoricalPart(np.arange(len(self.n_levels)), self.n_levels, self.alpha, self.missing)
        ]

    def _thetas(self, params):
        return [params.probabilities]

    def _make(self, weights, thetas):
        return CategoricalParams(np.asarray(weights, dtype=np.float64), thetas[0])

    def make_params(self, weights, probabilities):
        return self._make(weights, [np.asarray(probabilities, dtype=np.float64)])


@dataclass(frozen=True)
class PoissonParams:
    """Weights (k,) and rates (k, d)."""

    weights: np.ndarray
    rates: np.ndarray


class PoissonFamily(ProductMixtureFamily):
    """Mixture of products of Poisson distributions over ``n_features`` count columns."""

    name = "poisson"

    def __init__(self, n_components, n_features, **kwargs):
        self.n_features = int(n_features)
        super().__init__(n_components, **kwargs)

    def _parts(self):
        return [PoissonPart(np.arange(self.n_features), self.alpha, self.missing)]

    def _thetas(self, params):
        return [params.rates]

    def _make(self, weights, thetas):
        return PoissonParams(np.asarray(weights, dtype=np.float64), thetas[0])

    def make_params(self, weights, rates):
        return self._make(weights, [np.asarray(rates, dtype=np.float64)])
