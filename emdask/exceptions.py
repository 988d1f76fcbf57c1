"""Warnings and errors raised by emdask."""


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the mean log-likelihood settled within ``tol``."""


class DataWarning(UserWarning):
    """The data can be fitted, but something about it deserves a look (a constant column,
    a component with fewer rows than parameters, ...)."""
