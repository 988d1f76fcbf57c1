"""The fast E-step kernels against the plain per-component reference."""

import numpy as np
import pytest

from emdask.families import _kernels
from emdask.families.gaussian import GaussianFamily, reference_partial_stats

COV_TYPES = ["full", "tied", "diag", "spherical"]
PATHS = ["numpy"] + (["compiled"] if _kernels.compiled_available() else [])


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setattr(_kernels, "use_compiled", request.param == "compiled")
    return request.param


def random_params(cov_type, k, d, seed, spread=2.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mats = [scale**2 * (a @ a.T / d + np.eye(d)) for a in rng.normal(size=(k, d, d))]
    cov = {
        "full": np.stack(mats),
        "tied": mats[0],
        "diag": scale**2 * rng.uniform(0.5, 2, (k, d)),
        "spherical": scale**2 * rng.uniform(0.5, 2, k),
    }[cov_type]
    w = rng.dirichlet(np.ones(k) * 3)
    return GaussianFamily(k, cov_type).make_params(w, rng.normal(0, spread, (k, d)), cov)


def sample(params, cov_type, n, seed):
    X, _ = GaussianFamily(params.means.shape[0], cov_type).sample(
        params, n, np.random.default_rng(seed)
    )
    return np.random.default_rng(seed + 1).permutation(X)


def with_missing(X, rate, seed):
    rng = np.random.default_rng(seed)
    X = X.copy()
    X[rng.random(X.shape) < rate] = np.nan
    X[3] = np.nan  # a row with nothing observed
    return X


def rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def assert_same_stats(a, b, rtol):
    assert a.n_rows == pytest.approx(b.n_rows, rel=1e-14)
    assert a.loglik == pytest.approx(b.loglik, rel=rtol)
    for key in ("nk", "s1", "s2"):
        assert rel(a.terms[key], b.terms[key]) < rtol, key


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.6])
@pytest.mark.parametrize("weighted", [False, True])
def test_fast_kernel_matches_the_reference(path, cov_type, rate, weighted):
    k, d = 4, 7
    params = random_params(cov_type, k, d, seed=1)
    X = sample(params, cov_type, 3000, seed=2)  # not a multiple of any chunk size
    if rate:
        X = with_missing(X, rate, seed=3)
    weights = np.random.default_rng(4).poisson(1.0, len(X)).astype(float) if weighted else None
    family = GaussianFamily(k, cov_type)
    fast = family.partial_stats(X, params, weights)
    ref = reference_partial_stats(family, X, params, weights)
    assert_same_stats(fast, ref, 1e-12)
    s2 = fast.terms["s2"]
    if s2.ndim == 3:
        np.testing.assert_array_equal(s2, s2.transpose(0, 2, 1))


@pytest.mark.parametrize("cov_type", ["full", "tied"])
@pytest.mark.parametrize("d", [9, 20])
def test_many_missing_patterns_and_columns(path, cov_type, d):
    """Every missing count from 1 to d - 1, several rows per pattern and unique ones (patterns
    found by table lookup up to 16 columns, by sorting beyond)."""
    k = 3
    params = random_params(cov_type, k, d, seed=5)
    X = sample(params, cov_type, 2500, seed=6)
    rng = np.random.default_rng(7)
    counts = rng.integers(0, d + 1, len(X))
    for i, m in enumerate(counts):
        X[i, rng.choice(d, m, replace=False)] = np.nan
    X[:400] = X[400:800]  # repeated patterns (and rows)
    family = GaussianFamily(k, cov_type)
    assert_same_stats(family.partial_stats(X, params), reference_partial_stats(family, X, params), 1e-12)


@pytest.mark.parametrize("cov_type", ["full", "tied"])
def test_rows_taken_in_pattern_order_when_the_tables_outgrow_the_cache(path, cov_type):
    """Thousands of patterns (their tables above a MiB): the whole-block kernel takes the rows
    in pattern order; with unweighted and weighted rows the statistics are the reference's."""
    k, d = 6, 14
    params = random_params(cov_type, k, d, seed=51)
    X = with_missing(sample(params, cov_type, 6000, seed=52), 0.25, seed=53)
    miss = np.isnan(X)
    patterns, counts = np.unique(miss[~miss.all(axis=1)], axis=0, return_counts=True)
    m = patterns.sum(axis=1)
    table_bytes = int((8 * k * (m * m + 1)).sum())
    if path == "compiled":
        from emdask.families import _compiled

        assert table_bytes > _compiled.SORT_TABLE_BYTES  # the case this test is about
    w = np.random.default_rng(54).poisson(1.0, len(X)).astype(float)
    family = GaussianFamily(k, cov_type)
    for weights in (None, w):
        expected = reference_partial_stats(family, X, params, weights)
        for layout in (np.ascontiguousarray(X), np.asfortranarray(X)):
            assert_same_stats(family.partial_stats(layout, params, weights), expected, 1e-11)


@pytest.mark.parametrize("d", [60, 70])
def test_wide_rows_sort_their_patterns_by_bytes(path, d):
    """Up to 62 columns a pattern is one integer key; wider rows find their patterns with
    numpy and go through the same compiled kernel."""
    k = 2
    params = random_params("full", k, d, seed=8)
    X = with_missing(sample(params, "full", 300, seed=9), 0.1, seed=10)
    w = np.random.default_rng(11).poisson(1.0, len(X)).astype(float)
    family = GaussianFamily(k, "full")
    for weights in (None, w):
        for layout in (np.ascontiguousarray(X), np.asfortranarray(X)):
            assert_same_stats(family.partial_stats(layout, params, weights),
                              reference_partial_stats(family, X, params, weights), 1e-11)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_large_common_offset_loses_nothing(path, cov_type, rate):
    """A column with mean 1e6 and spread 1: the common shift removes the offset exactly."""
    k, d = 3, 4
    params = random_params(cov_type, k, d, seed=11)
    X = with_missing(sample(params, cov_type, 2000, seed=12), rate, seed=13) if rate else sample(
        params, cov_type, 2000, seed=12
    )
    offset = np.array([1e6, 0.0, -3e5, 0.0])
    moved = type(params)(
        params.weights, params.means + offset, params.covariances,
        params.precisions_cholesky, params.covariance_type,
    )
    family = GaussianFamily(k, cov_type)
    fast = family.partial_stats(X + offset, moved)
    ref = reference_partial_stats(family, X, params)  # the centred problem
    assert_same_stats(fast, ref, 1e-9)


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_components_far_apart_keep_their_precision(path, rate):
    """Components 1e4 spreads apart: the error of the shared shift grows only linearly in
    the separation (eps · 1e4 ≈ 2e-12), against the per-component reference."""
    k, d = 3, 5
    params = random_params("full", k, d, seed=14, spread=1e4)
    X = sample(params, "full", 3000, seed=15)
    if rate:
        X = with_missing(X, rate, seed=16)
    family = GaussianFamily(k, "full")
    fast = family.partial_stats(X, params)
    ref = reference_partial_stats(family, X, params)
    # per component, relative to that component's own scale
    for j in range(k):
        nk = ref.terms["nk"][j]
        assert fast.terms["nk"][j] == pytest.approx(nk, rel=1e-10)
        cov_scale = np.max(np.abs(params.covariances[j])) * nk
        assert np.max(np.abs(fast.terms["s2"][j] - ref.terms["s2"][j])) < 1e-10 * cov_scale
        assert np.max(np.abs(fast.terms["s1"][j] - ref.terms["s1"][j])) < 1e-10 * np.sqrt(cov_scale * nk)
    assert fast.loglik == pytest.approx(ref.loglik, rel=1e-12)


def test_empty_block_all_missing_rows_and_zero_weights(path):
    k, d = 2, 3
    params = random_params("full", k, d, seed=17)
    family = GaussianFamily(k, "full")
    empty = family.partial_stats(np.empty((0, d)), params)
    assert empty.n_rows == 0 and empty.loglik == 0
    assert not np.any(empty.terms["s2"])
    X = np.full((5, d), np.nan)
    blank = family.partial_stats(X, params)
    assert blank.n_rows == 0 and not np.any(blank.terms["nk"])
    X = sample(params, "full", 50, seed=18)
    w = np.zeros(50)
    w[::2] = 2.0
    assert_same_stats(
        family.partial_stats(X, params, w), reference_partial_stats(family, X, params, w), 1e-12
    )


@pytest.mark.parametrize("cov_type", ["full", "tied"])
def test_column_major_blocks_give_the_same_statistics(path, cov_type):
    """Parquet partitions reach the kernel column-major: rows all missing, rows of weight
    zero and missing cells are found the same way as in a row-major block."""
    k, d = 3, 6
    params = random_params(cov_type, k, d, seed=41)
    X = with_missing(sample(params, cov_type, 3000, seed=42), 0.1, seed=43)
    holes = X.copy()
    holes[::97] = np.nan
    X[3] = 0.5  # every row observed somewhere: chunks of consecutive rows
    w = np.random.default_rng(44).poisson(1.0, len(X)).astype(float)
    family = GaussianFamily(k, cov_type)
    for table, weights in ((holes, None), (holes, w), (X, None)):
        expected = reference_partial_stats(family, table, params, weights)
        for layout in (np.ascontiguousarray(table), np.asfortranarray(table)):
            assert_same_stats(family.partial_stats(layout, params, weights), expected, 1e-12)


@pytest.mark.parametrize("order", ["C", "F"])
def test_read_only_blocks_give_the_same_statistics(path, order):
    """Blocks that cannot be written to (memory-mapped files, Arrow buffers), with read-only
    row weights: the statistics of a writable copy, and the reference's."""
    k, d = 3, 6
    params = random_params("full", k, d, seed=71)
    X = np.asarray(with_missing(sample(params, "full", 2000, seed=72), 0.2, seed=73), order=order)
    w = np.random.default_rng(74).poisson(1.0, len(X)).astype(float)
    family = GaussianFamily(k, "full")
    frozen, frozen_w = X.copy(order="K"), w.copy()
    frozen.flags.writeable = frozen_w.flags.writeable = False
    for weights, frozen_weights in ((None, None), (w, frozen_w)):
        got = family.partial_stats(frozen, params, frozen_weights)
        assert_same_stats(got, family.partial_stats(X, params, weights), 1e-15)
        assert_same_stats(got, reference_partial_stats(family, X, params, weights), 1e-12)


@pytest.mark.parametrize("cov_type", ["full", "tied"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_missing_cells_with_a_singular_precision_raise_the_ill_defined_error(
    path, cov_type, order
):
    """A precision whose block on some row's missing cells is not positive definite (a
    zero row of its Cholesky factor): a ValueError that says what to do, as in the
    numpy steps."""
    from emdask.families.base import ILL_DEFINED

    k, d = 2, 5
    params = random_params(cov_type, k, d, seed=75)
    X = np.asarray(sample(params, cov_type, 500, seed=76), order=order)
    X[10, [1, 2]] = np.nan  # P_mm includes P[2, 2] = 0 below
    chol = params.precisions_cholesky.copy()
    if cov_type == "full":
        chol[1, 2, :] = 0.0
    else:
        chol[2, :] = 0.0
    broken = type(params)(params.weights, params.means, params.covariances, chol,
                          params.covariance_type)
    family = GaussianFamily(k, cov_type)
    with pytest.raises(ValueError, match="increase reg_covar") as raised, np.errstate(
        divide="ignore", invalid="ignore"  # log det of the factor: -inf
    ):
        family.partial_stats(X, broken)
    assert str(raised.value) == ILL_DEFINED


@pytest.mark.parametrize("m", [1, 2, 3, 6, 11])
def test_batched_cholesky_inverse(m):
    rng = np.random.default_rng(m)
    A = rng.normal(size=(5, 4, m, m))
    A = A @ np.swapaxes(A, -1, -2) + 0.1 * np.eye(m)
    inverse, log_det = _kernels.batched_cholesky_inverse(A)
    np.testing.assert_allclose(inverse, np.linalg.inv(A), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(A)[1], rtol=1e-12, atol=1e-12)
    A[2, 1] = -np.eye(m)
    with pytest.raises(ValueError, match="reg_covar"):
        _kernels.batched_cholesky_inverse(A)


def test_compiled_kernel_is_built_in_this_installation():
    """The C module is built with the package: a missing build fails here (the numpy
    steps would run silently, and far slower), unless EMDASK_COMPILED=0 asks for them."""
    import os

    if os.environ.get("EMDASK_COMPILED", "1") == "0":
        assert _kernels._compiled_kernels() is None
        return
    import emdask.families._cgaussian  # noqa: F401  (an ImportError fails the test)

    assert _kernels.compiled_available()
    assert _kernels._compiled_kernels() is not None


CPU_VERSIONS = []
if _kernels.compiled_available():
    from emdask.families import _cgaussian

    CPU_VERSIONS = _cgaussian.versions()


@pytest.fixture(params=CPU_VERSIONS)
def cpu_version(request):
    """Each CPU version of the compiled block kernel this machine runs (the widest is the
    one in use otherwise)."""
    _cgaussian.use_version(request.param)
    yield request.param
    _cgaussian.use_version(CPU_VERSIONS[0])


@pytest.mark.skipif(not _kernels.compiled_available(), reason="needs the compiled C module")
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("share", [0.02, 0.9])
def test_compiled_kernel_matches_the_numpy_steps_for_every_missing_count(
    monkeypatch, cpu_version, order, weighted, share
):
    """Rows missing 0 to 8 cells (the counts the compiler specialises and the loop for any
    other), in chunks where few rows miss cells (their conditional terms row by row) or
    most do (from the whole chunk's products): every CPU version of the compiled kernel
    gives the numpy steps' statistics, row- and column-major, with and without row weights
    (10 columns: blocks of outputs and moments cut short; the last chunk's rows not a
    whole number of vectors)."""
    k, d = 3, 10
    params = random_params("full", k, d, seed=61)
    X = sample(params, "full", 4003, seed=62)
    rng = np.random.default_rng(63)
    counts = np.where(rng.random(len(X)) < share, rng.integers(1, 9, len(X)), 0)
    for i in np.flatnonzero(counts):
        X[i, rng.choice(d, counts[i], replace=False)] = np.nan
    assert set(np.isnan(X).sum(axis=1)) == set(range(9))
    X = np.asarray(X, order=order)
    w = rng.poisson(1.0, len(X)).astype(float) if weighted else None
    family = GaussianFamily(k, "full")
    compiled = family.partial_stats(X, params, w)
    monkeypatch.setattr(_kernels, "use_compiled", False)
    assert_same_stats(compiled, family.partial_stats(X, params, w), 1e-12)
    assert_same_stats(compiled, reference_partial_stats(family, X, params, w), 1e-12)


@pytest.mark.skipif(not _kernels.compiled_available(), reason="needs the compiled C module")
@pytest.mark.parametrize("weighted", [False, True])
def test_runs_of_rows_missing_the_same_cells_match_the_numpy_steps(cpu_version, weighted,
                                                                    monkeypatch):
    """Rows missing the same cells one after the other (as rows taken in pattern order
    are) have their conditional terms computed a vector of rows at a time: runs of every
    length around the vector width, of 1 to 7 (and 11) missing cells, broken by complete
    rows and by rows of other patterns, give the numpy steps' statistics in every CPU
    version."""
    k, d = 3, 13
    params = random_params("full", k, d, seed=71)
    X = sample(params, "full", 6000, seed=72)
    rng = np.random.default_rng(73)
    at = 0
    while at < len(X) - 40:
        m = int(rng.choice([1, 2, 3, 4, 5, 7, 11]))
        cols = rng.choice(d, m, replace=False)
        run = int(rng.integers(1, 40))
        X[at : at + run, cols] = np.nan
        at += run + int(rng.integers(0, 3))  # sometimes a complete row between runs
    w = rng.poisson(1.0, len(X)).astype(float) if weighted else None
    family = GaussianFamily(k, "full")
    compiled = family.partial_stats(X, params, w)
    monkeypatch.setattr(_kernels, "use_compiled", False)
    assert_same_stats(compiled, family.partial_stats(X, params, w), 1e-12)


@pytest.mark.skipif(not _kernels.compiled_available(), reason="needs the compiled C module")
def test_scratch_space_kept_between_blocks_changes_nothing():
    """The whole-block kernel reuses its scratch space from block to block: a small block
    after a large one with many more patterns (and the other way) gives the same bits as
    in a fresh thread."""
    k, d = 3, 9
    params = random_params("full", k, d, seed=31)
    small = with_missing(sample(params, "full", 300, seed=32), 0.05, seed=33)
    large = with_missing(sample(params, "full", 5000, seed=34), 0.15, seed=35)
    family = GaussianFamily(k, "full")

    def fresh(X):
        return fresh_with(family, X, params)

    def check(got, expected):
        assert (got.n_rows, got.loglik) == (expected.n_rows, expected.loglik)
        for key in ("nk", "s1", "s2"):
            np.testing.assert_array_equal(got.terms[key], expected.terms[key])

    expected_small, expected_large = fresh(small), fresh(large)
    for X, expected in ((large, expected_large), (small, expected_small),
                        (large, expected_large), (small, expected_small)):
        check(family.partial_stats(X, params), expected)
    # the pattern tables kept from block to block belong to one set of precisions: other
    # parameters (the next EM iteration) do not reuse them
    other = random_params("full", k, d, seed=36)
    check(family.partial_stats(large, other), fresh_with(family, large, other))
    check(family.partial_stats(large, params), expected_large)


@pytest.mark.skipif(not _kernels.compiled_available(), reason="needs the compiled C module")
@pytest.mark.parametrize("rate", [0.0, 0.15])
def test_patterns_kept_in_a_block_memo_are_found_once_and_change_nothing(rate, monkeypatch):
    """With a memo for its block (what a resident helper keeps), the kernel finds a block's
    missingness patterns at the first pass only, under any parameters, and every pass
    gives the bits of a pass without memo; passes with row weights find their own."""
    from emdask.families import _compiled
    from emdask.families.base import block_memo

    k, d = 3, 9
    params = random_params("full", k, d, seed=41)
    other = random_params("full", k, d, seed=42)
    X = sample(params, "full", 3000, seed=43)
    if rate:
        X = with_missing(X, rate, seed=44)
    family = GaussianFamily(k, "full")
    weights = np.random.default_rng(45).poisson(1.0, X.shape[0]).astype(float)
    expected = [fresh_with(family, X, p) for p in (params, other, params)]
    expected_weighted = fresh_with(family, X, (params, weights))
    found = []
    find = _compiled.find_patterns
    monkeypatch.setattr(_compiled, "find_patterns", lambda *a: found.append(1) or find(*a))
    memo = {}
    token = block_memo.set(memo)
    try:
        got = [family.partial_stats(X, p) for p in (params, other, params)]
        got_weighted = family.partial_stats(X, params, weights)
    finally:
        block_memo.reset(token)
    assert len(found) == 2  # the first pass, then the weighted one
    assert len(memo) == 1
    if not rate:
        assert list(memo.values()) == ["complete"]  # nothing kept but the fact
    for a, b in zip(got + [got_weighted], expected + [expected_weighted]):
        assert (a.n_rows, a.loglik) == (b.n_rows, b.loglik)
        for key in ("nk", "s1", "s2"):
            np.testing.assert_array_equal(a.terms[key], b.terms[key])


def fresh_with(family, X, params):
    """``family.partial_stats(X, params)`` in a new thread (with scratch space of its own)."""
    import threading

    out = []
    args = params if isinstance(params, tuple) else (params,)
    t = threading.Thread(target=lambda: out.append(family.partial_stats(X, *args)))
    t.start()
    t.join()
    return out[0]


@pytest.mark.skipif(not _kernels.compiled_available(), reason="needs the compiled C module")
def test_vectorised_exp_matches_numpy():
    from emdask.families._cgaussian import exp_nonpositive

    x = np.concatenate([
        -np.logspace(-17, np.log10(708.0), 20_001), np.linspace(-708.0, 0.0, 20_001),
        [0.0, -0.0, -np.inf, -708.5, -745.2, -1e300],
    ])
    q = x.copy().reshape(2, -1)
    exp_nonpositive(q)
    got = q.ravel()
    normal = x >= -708.0
    np.testing.assert_allclose(got[normal], np.exp(x[normal]), rtol=1e-15, atol=0)
    assert np.all(got[x == 0.0] == 1.0)  # exactly: a row's largest term is 1
    # below e^-708 (about 1e-308) the result is 0: such terms cannot change a row's sum,
    # which holds exp(0) = 1
    assert np.all(got[~normal] == 0.0)
