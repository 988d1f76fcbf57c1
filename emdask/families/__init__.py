"""Model families: pure numpy E-step statistics, M-step, log-likelihood and imputation."""

from .base import Stats
from .gaussian import COVARIANCE_TYPES, GaussianFamily, GaussianParams

__all__ = ["COVARIANCE_TYPES", "GaussianFamily", "GaussianParams", "Stats"]
