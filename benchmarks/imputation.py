"""Imputation accuracy and speed: emdask's EMImputer against mean filling and scikit-learn's
IterativeImputer, on data with known truth.

Accuracy: d=20, 20% of cells missing completely at random (MCAR) and, separately, missing at
random (MAR: cells of the last ten columns are lost more often when the first ten columns,
always observed, are high). RMSE of the filled cells on multivariate normal data and on
3-cluster mixture data.

Speed: time to fit and fill n x 20 (MCAR 20%) with emdask on a local cluster of two
single-threaded worker processes and with IterativeImputer on the same machine, in the same run.

Usage:  python benchmarks/imputation.py [--accuracy-rows 20000] [--speed-rows 200000 1000000]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

D = 20


def normal_data(n, rng):
    A = rng.normal(size=(D, D)) / np.sqrt(D)
    cov = A @ A.T + 0.2 * np.eye(D)
    return rng.multivariate_normal(rng.normal(0, 1, D), cov, n)


def mixture_data(n, rng):
    parts = []
    for j in range(3):
        A = rng.normal(size=(D, D)) / np.sqrt(D)
        parts.append(rng.multivariate_normal(rng.normal(0, 2.5, D), A @ A.T + 0.2 * np.eye(D), n // 3))
    X = np.vstack(parts)
    return X[rng.permutation(len(X))]


def mcar(X, rate, rng):
    mask = rng.random(X.shape) < rate
    mask[mask.all(axis=1), 0] = False
    return mask


def mar(X, rate, rng):
    """Columns 10..19 lost with a probability rising with the mean of columns 0..9."""
    drive = X[:, :10].mean(axis=1)
    z = (drive - drive.mean()) / drive.std()
    p_row = 1 / (1 + np.exp(-1.5 * z))
    p = np.clip(p_row / p_row.mean() * rate * 2, 0, 0.95)  # 2x: only half the columns can be lost
    mask = np.zeros(X.shape, dtype=bool)
    mask[:, 10:] = rng.random((len(X), 10)) < p[:, None]
    return mask


def rmse(filled, X, mask):
    return float(np.sqrt(np.mean((filled[mask] - X[mask]) ** 2)))


def accuracy(n, seed):
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    from emdask import EMImputer

    print(f"# accuracy: RMSE of filled cells, n={n:,}, d={D}, 20% missing (lower is better)")
    print(f"{'data':<9} {'missing':<8} {'mean':>8} {'iterative':>10} {'emdask k=1':>11} {'emdask k=3':>11}")
    for data_name, make in [("normal", normal_data), ("mixture", mixture_data)]:
        for miss_name, lose in [("MCAR", mcar), ("MAR", mar)]:
            rng = np.random.default_rng(seed)
            X = make(n, rng)
            mask = lose(X, 0.2, rng)
            Xm = np.where(mask, np.nan, X)
            col_mean = np.nanmean(Xm, axis=0)
            scores = {"mean": rmse(np.where(mask, col_mean, Xm), X, mask)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores["iterative"] = rmse(IterativeImputer(random_state=0).fit_transform(Xm), X, mask)
                for k in (1, 3):
                    imp = EMImputer(k, random_state=0, n_init=2 if k > 1 else 1, tol=1e-4)
                    scores[f"k={k}"] = rmse(imp.fit_transform(Xm), X, mask)
            print(
                f"{data_name:<9} {miss_name:<8} {scores['mean']:8.4f} {scores['iterative']:10.4f} "
                f"{scores['k=1']:11.4f} {scores['k=3']:11.4f}"
            )


def speed(sizes, seed):
    from distributed import Client, LocalCluster
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    from emdask import EMImputer

    print(f"# speed: fit + fill, d={D}, 20% MCAR; emdask on 2 worker processes x 1 thread")
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster):
        for n in sizes:
            rng = np.random.default_rng(seed)
            X = normal_data(n, rng)
            mask = mcar(X, 0.2, rng)
            Xm = np.where(mask, np.nan, X)
            start = time.perf_counter()
            imp = EMImputer(1, random_state=0, tol=1e-4)
            filled = imp.fit_transform(Xm)
            t_em = time.perf_counter() - start
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = IterativeImputer(random_state=0).fit_transform(Xm)
            t_it = time.perf_counter() - start
            print(
                f"rows={n:>9,}  emdask {t_em:7.2f}s ({imp.n_iter_} EM iterations, RMSE {rmse(filled, X, mask):.4f})  "
                f"IterativeImputer {t_it:7.2f}s (RMSE {rmse(ref, X, mask):.4f})  "
                f"speed-up {t_it / t_em:5.1f}x"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy-rows", type=int, default=30_000)
    parser.add_argument("--speed-rows", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    accuracy(args.accuracy_rows, args.seed)
    if args.speed_rows:
        speed(args.speed_rows, args.seed)


if __name__ == "__main__":
    main()
