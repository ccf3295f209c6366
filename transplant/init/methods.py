"""Importing this module registers every built-in initializer."""

from transplant.init import byte_pool, focus, fvt, knn, mean, omp, random, zero  # noqa: F401
