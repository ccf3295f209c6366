"""A rebuilt row may not claim more of every next-token distribution than the row it replaces.

In a tied model every new row is also an output row, and μ·row — μ the mean final hidden state over the
model's own text — is the token's logit prior: how much probability it takes in every context, whatever the
text. A row built by OMP can rebuild its donor row well and still point along μ far more than fvt-ls's row of
the same token (the mean of its own pieces), and then takes mass from tokens it has nothing to do with: on
SmolLM2 ← Gemma-3 the 17,050 rows `fvt-ls --set pursue_gap=0.4` switches took 2.8% of the probability on
number tables against 0.36% with fvt-ls's rows (Cyrillic "М" and a Kannada word where a digit was due) and
lost numbers by 0.032 bits/byte; with their prior capped at fvt-ls's, every slice is better than fvt-ls
(bench/RESULTS.md, "The switched rows' logit prior").

μ needs no held-out text: it is the mean final hidden state over a few sequences the base model samples from
its own start token (16 × 32 tokens, 5 s on SmolLM2-135M: cosine 0.98 with 16 × 256 tokens; 8 × 128 had cosine
0.97 with the mean over four held-out texts). The cap itself is a pure tensor function (`cap_logit_prior`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAMPLED_SEQUENCES = 16  # independent samples matter more than their length (bench/RESULTS.md)
SAMPLED_TOKENS = 32
# float32 weights up to this many bytes (fast on CPU); larger models sample in their own dtype
FLOAT32_LIMIT_BYTES = 6 * 2**30


@dataclass
class PriorCap:
    """Rows whose logit prior may not exceed a reference row's, and how to build those references.

    ids: long [n], new-vocabulary ids whose rows are capped.
    input_weights: sparse float32 [n, V_base], row i the reference plan of ids[i] (over base input rows).
    output_weights: sparse float32 [n, V_base] over base output rows, or None: the same as input_weights.
    """

    ids: torch.Tensor
    input_weights: torch.Tensor
    output_weights: torch.Tensor | None = None


def start_token(roles: Mapping[str, int]) -> int | None:
    """The id samples start from: the base tokenizer's bos, else its eos (a document boundary either way)."""
    return roles.get("bos", roles.get("eos"))


def cap_logit_prior(rows: torch.Tensor, reference: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """`rows` [n, D] with their component along û = μ/‖μ‖ lowered to the `reference` rows' [n, D] where it
    exceeds it: rows − relu((rows − reference)·û) ûᵀ. Directions orthogonal to μ — what tells the token's
    contexts apart — are kept; only the prior μ·row is capped at μ·reference."""
    unit = (mu / mu.norm().clamp_min(1e-12)).to(rows)
    excess = ((rows - reference.to(rows)) @ unit).clamp_min(0.0)
    return rows - excess[:, None] * unit


@torch.no_grad()
def mean_final_hidden(model, start_id: int, *, sequences: int = SAMPLED_SEQUENCES,
                      tokens: int = SAMPLED_TOKENS, seed: int = 0) -> torch.Tensor:
    """float32 [D]: the mean last hidden state (after the final norm: what meets the output rows) over
    `sequences` × `tokens` tokens the model samples from `start_id` (temperature 1, no truncation), so the
    prior comes from the model's own distribution of text, not from any text we hold."""
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        start = torch.full((sequences, 1), start_id, dtype=torch.long, device=device)
        sampled = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                 max_new_tokens=tokens, top_k=0, top_p=1.0, temperature=1.0,
                                 pad_token_id=start_id)
    finally:
        torch.random.set_rng_state(generator_state)
    hidden = model(sampled, output_hidden_states=True).hidden_states[-1][:, 1:]
    return hidden.float().reshape(-1, hidden.shape[-1]).mean(0).cpu()


def logit_prior_direction(model_dir: Path | None, start_id: int | None, *, device: str | torch.device = "cpu",
                          trust_remote_code: bool = False) -> tuple[torch.Tensor | None, str]:
    """(μ or None, why not): the base model's mean final hidden state, or None with the reason when it cannot
    be had (no model dir, no start token, transformers cannot load it); the caller leaves rows uncapped."""
    if model_dir is None:
        return None, "no base model dir"
    if start_id is None:
        return None, "the base tokenizer has no bos or eos token to sample from"
    from transformers import AutoModelForCausalLM

    from transplant.errors import first_line
    from transplant.io import safetensors
    from transplant.io.memory import available_bytes

    try:
        weight_bytes = sum(p.stat().st_size for p in safetensors.model_weight_files(Path(model_dir)))
        float32 = weight_bytes * 2 <= FLOAT32_LIMIT_BYTES  # bf16 on disk, twice that in float32
        needed, free = weight_bytes * (2 if float32 else 1), available_bytes(device)
        if free is not None and needed > 0.8 * free:
            return None, (f"the base model needs {needed / 2**30:.1f} GiB to sample from and "
                          f"{free / 2**30:.1f} GiB are free on {device}; run on a larger machine or set "
                          "pursue_prior_cap=false")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if float32 else "auto",
                                                     trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types; the cap is an improvement, not a requirement
        return None, f"transformers cannot load {model_dir} ({first_line(err)})"
    try:
        mu = mean_final_hidden(model.to(device).eval(), start_id)
    except Exception as err:  # an architecture transformers cannot generate with, a device out of memory
        return None, f"sampling from {model_dir} failed ({first_line(err)})"
    finally:
        del model
    if not torch.isfinite(mu).all():
        return None, f"{model_dir} gives non-finite hidden states"
    return mu, ""
