"""Solver layer: pure tensor functions, no models and no files. `omp` (exact Batch-OMP, docs/design.md §3),
`omp_screened` (its bf16-screened GPU path), `omp_common` (what both pursuits share), `sparsemax` (FOCUS's
weighting), `nearest` (each target's best |cosine| with an anchor, exact or estimated)."""
