"""Importing this module registers every built-in initializer."""

from transplant.init import (  # noqa: F401
    byte_pool,
    byte_pool_learned,
    focus,
    fvt,
    hypernet_init,
    knn,
    mean,
    omp,
    random,
    zero,
)
