"""emdask: the EM algorithm on dataframes too large for one machine.

Every model is map-reduce EM on Dask: each partition computes E-step sufficient statistics,
they are tree-reduced, and the M-step runs on the small result.
"""

from .estimators import GaussianMixture
from .estimators.imputer import EMImputer
from .estimators.categorical import CategoricalMixture
from .estimators.counts import BernoulliMixture, BinomialMixture, PoissonMixture
from .estimators.mixed import MixedMixture
from .exceptions import ConvergenceWarning, DataWarning, ModelFileError, WorkersPaused
from ._version import __version__
from .persistence import load, register_estimator, save
from .selection import SelectionResult, select_components
from .pooling import PooledEstimate, pool


__all__ = [
    "BernoulliMixture",
    "BinomialMixture",
    "CategoricalMixture",
    "MixedMixture",
    "PoissonMixture",
    "ConvergenceWarning",
    "DataWarning",
    "EMImputer",
    "GaussianMixture",
    "PooledEstimate",
    "ModelFileError",
    "SelectionResult",
    "load",
    "register_estimator",
    "save",
    "select_components",
    "WorkersPaused",
    "__version__",
    "pool",
]
