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


class StateError(ValueError):
    """Fitted state that no fitted model holds, found by an estimator's ``_set_state``.

    ``attr`` names the attribute (or array) and ``problem`` says what is wrong with it;
    ``in_arrays`` tells an array from a metadata value. Readers of model files turn it
    into a :class:`ModelFileError` naming the file and what to do.
    """

    def __init__(self, attr, problem, *, in_arrays=False):
        super().__init__(f"{attr} {problem}")
        self.attr = attr
        self.problem = problem
        self.in_arrays = in_arrays
