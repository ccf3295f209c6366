"""The package version, in a bottom-layer module so reports and model cards can cite it without importing the
public API (`transplant/__init__.py` re-exports the pipeline, the top layer)."""

__version__ = "0.1.0"
