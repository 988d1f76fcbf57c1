"""Warnings and errors raised by emdask."""


from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning


class ConvergenceWarning(_SklearnConvergenceWarning):
    """EM stopped at ``max_iter`` before the mean log-likelihood settled within ``tol``."""


class DataWarning(UserWarning):
    """The data can be fitted, but something about it deserves a look (a constant column,
    a component with fewer rows than parameters, ...)."""


class WorkersPaused(MemoryError):
    """Every Dask worker stayed paused at its memory limit while a pass waited on it: the
    pass cannot go on until a worker frees memory, so it is stopped instead of waiting for
    ever."""


class ModelFileError(ValueError):
    """A model file or checkpoint that cannot be read: corrupted, edited, of an unknown
    estimator, written by a newer emdask, or holding what no fitted model holds (arrays of
    the wrong shape, non-finite numbers, weights off the simplex, covariances that are not
    positive definite, attributes the estimator does not declare, arrays that would expand
    beyond their declared size). The message names the file, the attribute and what to do."""
