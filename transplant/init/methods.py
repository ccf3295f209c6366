"""Importing this module registers every built-in initializer (plug-ins come through the
`tokentransplant.initializers` entry point; see `transplant.init.registry`)."""

from transplant.init import (  # noqa: F401
    byte_pool,
    byte_pool_learned,
    focus,
    fvt,
    knn,
    mean,
    omp,
    random,
    zero,
)
