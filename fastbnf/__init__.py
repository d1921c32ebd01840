r"""fastbnf - Bayesian neural networks and flows with fused sampling and KL kernels.

A drop-in replacement for :class:`zuko.bayesian.BayesianModel` whose per-step work runs as one
fused op per group of parameters, in C++ on CPU, CUDA on GPUs, or pure PyTorch elsewhere.
"""

__version__ = "0.1.0"

__all__ = [
    "BayesianModel",
    "backend",
    "cached_bytes",
    "empty_cache",
    "metrics",
    "optim",
]

from . import metrics, optim
from ._backend import backend
from .model import BayesianModel
from .cache import cached_bytes, empty_cache
