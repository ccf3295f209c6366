"""The shape every initializer shares: a sparse base→new weight matrix, plus optional dense rows.

Almost every training-free method builds each new row as a weighted sum of base rows (copy = one-hot, FVT =
mean of pieces, OMP = k anchors), so a method returns `W` (new_vocab × base_vocab, sparse) and the pipeline
computes `E_new = W @ E_base` once for the input and once for the output embedding. Methods whose rows are not
sums of base rows (random, learned) add dense rows that override W's result for the ids they cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transplant.errors import TransplantError
from transplant.init.logit_prior import PriorCap
from transplant.tokenizers.align import Alignment
from transplant.tokenizers.vocab import TokenKind, Vocab

# (role, base matrix [V_base, D]) -> (new ids [n], rows [n, D]) overriding the sparse result
DenseRows = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(kw_only=True)
class InitContext:
    """Everything an initializer may look at. Donor fields are None when the donor is only a tokenizer.

    `options` are the method's `--set` values, typed and complete (see `registry.parse_options`)."""

    base_vocab: Vocab
    new_vocab: Vocab
    alignment: Alignment
    base_input: torch.Tensor  # [V_base, D]
    base_output: torch.Tensor | None  # [V_base, D]; None when tied
    donor_input: torch.Tensor | None = None  # [V_new, D_donor]
    donor_output: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    device: str | torch.device = "cpu"
    base_model_dir: Path | None = None  # the whole base model, for steps that run it (logit_prior.py)
    trust_remote_code: bool = False

    def require_donor(self, method: str) -> None:
        """Donor rows must exist for every new id, except the base's control tokens carried into the new
        tokenizer with the chat template (appended after the donor's ids; their rows come from the base)."""
        if self.donor_input is None:
            raise TransplantError(
                f"method {method!r} needs donor embeddings but the donor is only a tokenizer; "
                "pass a donor model (a dir with weights or a model alias) or use --method fvt"
            )
        n_rows, shared = self.donor_input.shape[0], self.alignment.shared_mask
        uncovered = [i for i in range(n_rows, len(self.new_vocab))
                     if not (self.new_vocab.kinds[i] is TokenKind.SPECIAL and bool(shared[i]))]
        if uncovered:
            raise TransplantError(
                f"donor embeddings have {n_rows} rows but its tokenizer has {n_rows + len(uncovered)} ids; "
                "the donor model and tokenizer do not belong together"
            )


@dataclass
class InitPlan:
    """How to build the new input (and output) embeddings from the base ones."""

    input_weights: torch.Tensor  # sparse COO [V_new, V_base]
    output_weights: torch.Tensor | None = None  # None: same as input_weights
    dense_rows: DenseRows | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # method details for the report
    prior_cap: PriorCap | None = None  # rows whose logit prior may not exceed a reference's (logit_prior.py)


def sparse_rows(rows: list[int], cols: list[int], values: list[float],
                shape: tuple[int, int]) -> torch.Tensor:
    """A coalesced float32 sparse COO matrix from triplets."""
    indices = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(indices, torch.tensor(values, dtype=torch.float32), shape,
                                   check_invariants=True).coalesce()


def replace_rows(weights: torch.Tensor, row_ids, rows, cols, vals) -> torch.Tensor:
    """Sparse plan `weights` with the rows `row_ids` dropped and the triplets (rows, cols, vals) put in their
    place (lists or 1-d tensors): one method's rows for some tokens, another's for the rest."""
    weights = weights.coalesce()
    keep = ~torch.isin(weights.indices()[0], torch.as_tensor(row_ids, dtype=torch.long))
    indices = torch.cat([weights.indices()[:, keep],
                         torch.stack([torch.as_tensor(rows, dtype=torch.long),
                                      torch.as_tensor(cols, dtype=torch.long)]).reshape(2, -1)], 1)
    values = torch.cat([weights.values()[keep], torch.as_tensor(vals, dtype=torch.float32)])
    return torch.sparse_coo_tensor(indices, values, weights.shape, check_invariants=True).coalesce()


def copy_shared(alignment: Alignment, base_size: int) -> tuple[list[int], list[int], list[float]]:
    """Triplets of the exact copy of every shared token (the part every method has in common)."""
    new_ids = alignment.shared_new_ids
    base_ids = alignment.new_to_base[new_ids]
    return new_ids.tolist(), base_ids.tolist(), [1.0] * int(new_ids.numel())


def normal_base_ids(vocab: Vocab) -> torch.Tensor:
    """Base ids that are real text pieces: the population for mean/covariance statistics."""
    return torch.tensor([i for i, kind in enumerate(vocab.kinds) if kind is not TokenKind.SPECIAL],
                        dtype=torch.long)


# float32 temporaries per chunk: a 70B model's 128k x 8192 matrix is never upcast whole
CHUNK_BYTES = 128 * 2**20


def chunk_rows(width: int) -> int:
    """Rows of `width` float32 values that fit in CHUNK_BYTES (65,536 at D=512, 4,096 at D=8,192)."""
    return max(1, CHUNK_BYTES // (4 * max(width, 1)))


def row_mean(matrix: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 mean of `matrix[ids]` (all rows when None), accumulated chunk by chunk in float64:
    `matrix[ids].float()` would hold a float32 copy of almost the whole matrix (4 GB for one Llama-3-70B
    embedding)."""
    ids = torch.arange(matrix.shape[0]) if ids is None else ids
    total = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    chunk = chunk_rows(matrix.shape[1])
    for start in range(0, ids.numel(), chunk):
        total += matrix[ids[start : start + chunk].to(matrix.device)].float().sum(0, dtype=torch.float64)
    return (total / max(ids.numel(), 1)).float()


def row_norms(matrix: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 L2 norm of each row of `matrix[ids]` (all rows when None), chunk by chunk (see row_mean)."""
    ids = torch.arange(matrix.shape[0]) if ids is None else ids
    chunk = chunk_rows(matrix.shape[1])
    parts = [matrix[ids[start : start + chunk].to(matrix.device)].float().norm(dim=1)
             for start in range(0, ids.numel(), chunk)]
    return torch.cat(parts) if parts else matrix.new_zeros(0, dtype=torch.float32)


def mean_rows(new_ids: torch.Tensor, population: torch.Tensor) -> DenseRows:
    """Dense-row hook filling `new_ids` with the mean of the base rows in `population` (the fallback several
    methods use for tokens they cannot build, e.g. new specials without bytes)."""

    def rows(role: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = row_mean(base, population)
        return new_ids, mean.expand(int(new_ids.numel()), -1)

    return rows


def apply_plan_matrix(weights: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`weights @ base` in float32, in row chunks so the intermediate stays small; result in float32. Base
    rows are upcast per chunk as they are gathered, never as a whole float32 copy of `base`."""
    weights = weights.coalesce()
    n_rows = weights.shape[0]
    out = torch.zeros(n_rows, base.shape[1], dtype=torch.float32, device=base.device)
    indices, values = weights.indices(), weights.values()
    chunk = chunk_rows(base.shape[1])
    # index_add over non-zeros: memory O(nnz·D / chunks), exact, and the same code path on CPU and GPU
    for start in range(0, values.numel(), chunk):
        rows = indices[0, start : start + chunk].to(base.device)
        cols = indices[1, start : start + chunk].to(base.device)
        vals = values[start : start + chunk].to(base.device)
        out.index_add_(0, rows, base[cols].float() * vals[:, None])
    return out


def build_embedding(plan: InitPlan, role: str, base: torch.Tensor) -> torch.Tensor:
    """New embedding matrix (float32) for `role` ("input" or "output") from the base matrix of that role."""
    weights = plan.input_weights if role == "input" or plan.output_weights is None else plan.output_weights
    out = apply_plan_matrix(weights, base)
    if plan.dense_rows is not None:
        ids, rows = plan.dense_rows(role, base)
        if ids.numel():
            out[ids.to(out.device)] = rows.to(out.device, torch.float32)
    return out
