"""Initializer layer: every method returns an `InitPlan`, a sparse base→new matrix plus optional dense rows
(docs/design.md §2).

The contract and registry: `base` (`InitPlan`, `InitContext`, chunked application), `registry` (typed
`Option`s, entry-point discovery). Methods, one module each: `zero`, `mean`, `random`, `fvt`, `fvt_ls`,
`byte_pool`, `byte_pool_learned`, `omp`, `knn`, `sparsemax_knn`, `focus` (with its fastText space in
`static_embeddings`); `donor` is what the donor-space methods share. Pipeline steps after any method:
`numbers` (dedicated number rows), `logit_prior` (rebuilt rows' logit prior capped at a reference row's),
`reachable` (ids a tokenizer never emits), `repair` (unreachable and near-duplicate rows), `apply` (plan →
new matrices, the tie decision).
"""
