"""Importing this module registers every built-in initializer."""

from transplant.init import fvt, mean, random, zero  # noqa: F401
