"""scikit-learn style estimators over the EM engine."""

from .base import BaseMixture
from .gaussian import GaussianMixture

__all__ = ["BaseMixture", "GaussianMixture"]
