"""Cross-tokenizer distillation losses, registered by name.

Every loss is a pure function over tensors with one signature:

    loss_fn(batch: Mapping[str, Any], *, num_items=None, **options) -> (loss: Tensor scalar, metrics: dict)

`batch` keys (what each loss reads is in its docstring):
    "student_logits"  [B, Ts, Vs]       "teacher_logits"  [B, Tt, Vt]   (teacher side is always detached)
    "alignment"       distill.chunks.ChunkAlignment (on the logits' device)
    "student_input_ids", "teacher_input_ids", "student_attention_mask", "teacher_attention_mask"
                      optional: default to the alignment's padded ids and masks
    "student_hidden_states", "teacher_hidden_states"  [B, T, D], last layer (ALM hidden-state term)
    trainable modules what the loss's `modules` hook builds, attached to the student: ALM "hidden_projection"
    per-pair extras   what the loss's `prepare` hook returns, built once per run and merged into every batch:
                      ALM: "student_boundary_mask", "teacher_boundary_mask"  bool [V] (debias merge/append),
                      or "student_word_start_mask", "teacher_word_start_mask" (debias whitespace)
                      MinED: "mined_mapping"  long [Vs], student id -> teacher id (-1: none)

Normalisation: a loss returns sum(per-item losses) / num_items, where an item is the unit the loss counts
(valid chunks for ALM, predicted tokens for CE, aligned positions for ULD/MinED). With gradient accumulation
or data parallelism, pass the global count (summed over micro-batches and ranks) as `num_items`, so every item
weighs the same whatever micro-batch it lands in; `get_loss(name).count_items(batch)` computes a batch's count
without logits, so the data loader can total it ahead of the step. `num_items=None` uses the local count.
Metrics are detached 0-dim tensors (no host sync); "loss" and "num_items_local" are always present.

What the trainer must know about a loss (teacher needed, summed metrics, typed options, hidden states,
per-pair extras) is declared with it at registration: see `distill.losses.registry`. Losses are found through
the `tokentransplant.losses` entry points (pyproject.toml), so adding one is one new module with one
`@register(...)` plus one line there; importing this package registers none of them.
"""

from __future__ import annotations

from distill.losses.registry import (
    ALWAYS_SUMMED,
    ANCHOR_LOSS,
    LOSSES,
    LossSpec,
    Option,
    PairContext,
    available_losses,
    get_loss,
    loss_options,
    register,
)

__all__ = ["ALWAYS_SUMMED", "ANCHOR_LOSS", "LOSSES", "LossSpec", "Option", "PairContext", "available_losses",
           "get_loss", "loss_options", "register"]
