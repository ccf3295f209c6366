"""Cross-tokenizer distillation losses, registered by name.

Every loss is a pure function over tensors with one signature:

    loss_fn(batch: Mapping[str, Any], *, num_items=None, **options) -> (loss: Tensor scalar, metrics: dict)

`batch` keys (what each loss reads is in its docstring):
    "student_logits"  [B, Ts, Vs]       "teacher_logits"  [B, Tt, Vt]   (teacher side is always detached)
    "alignment"       distill.chunks.ChunkAlignment (on the logits' device)
    "student_input_ids", "teacher_input_ids", "student_attention_mask", "teacher_attention_mask"
                      optional: default to the alignment's padded ids and masks
    "student_hidden_states", "teacher_hidden_states"  [B, T, D], last layer (ALM hidden-state term)
    "student_word_start_mask", "teacher_word_start_mask"  bool [V] (ALM debiasing; `chunks.word_start_mask`)
    "mined_mapping"   long [Vs] student id -> teacher id (`losses.mined.mined_mapping`)

Normalisation: a loss returns sum(per-item losses) / num_items, where an item is the unit the loss counts
(valid chunks for ALM, predicted tokens for CE, aligned positions for ULD/MinED). With gradient accumulation or
data parallelism, pass the global count (summed over micro-batches and ranks) as `num_items`, so every item
weighs the same whatever micro-batch it lands in; `get_loss(name).count_items(batch)` computes a batch's count
without logits, so the data loader can total it ahead of the step. `num_items=None` uses the local count.
Metrics are detached 0-dim tensors (no host sync); "num_items_local" is always present.
"""

from __future__ import annotations

from collections.abc import Callable

from transplant.errors import TransplantError

LOSSES: dict[str, Callable] = {}


def register(name: str, *, count_items: Callable | None = None) -> Callable[[Callable], Callable]:
    """Register a loss under `name`; `count_items(batch) -> int` gives its normaliser for a batch."""

    def wrap(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        fn.count_items = count_items
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> Callable:
    try:
        return LOSSES[name]
    except KeyError as err:
        raise TransplantError(f"unknown distillation loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}") from err


from distill.losses import alm, ce, mined, uld  # noqa: E402,F401  (registers the built-in losses)
