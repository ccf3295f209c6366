"""The hypernetwork's two losses, as functions of rows it already predicted (one hypernetwork call per
micro-batch serves both, so DeepSpeed sees one forward and one backward).

LM loss: the frozen base LM reads the predicted input rows of a batch tokenized with a sampled tokenizer and
scores the next token against the predicted output rows of a *vocabulary subset*: the batch's tokens plus
`negatives` random ids of the sampled vocabulary. The softmax runs over that subset, not the full sampled
vocabulary; the random negatives' logits are raised by log((V - b) / m) (m negatives standing for the V - b
tokens outside the batch) so the subset's partition function estimates the full one (sampled softmax, Jean et
al. 2015). Without the correction the loss rewards raising every predicted output row against a tiny field of
negatives, and at apply time (full softmax) new tokens are over-predicted (bench/RESULTS.md, Hypernetwork).
This is what makes a step cost O(batch vocabulary) instead of O(vocabulary).

Tokens whose bytes exist in the base vocabulary are copied (as at apply time) unless `predict_shared` is set.
An output bias (lm_head.bias) is copied for those and averaged over the pieces (FVT) for predicted ones.

Auxiliary loss: predictions for base tokens, decomposed into strictly shorter base pieces
(`decompose_without_self`), regressed onto their true rows: cheap, dense supervision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hypernet.lm import LMParts, embed, hidden_states, output_logits
from hypernet.model import decompose
from hypernet.sample import TrainTokenizer
from transplant.tokenizers.vocab import Vocab


class TokenizerPieces:
    """A sampled tokenizer with its ids decomposed into base pieces once (the per-step work is then
    indexing)."""

    def __init__(self, tok: TrainTokenizer, base: Vocab, max_pieces: int):
        self.tok = tok
        self.ids, self.mask = decompose(base, tok.token_bytes, max_pieces)
        base_ids = [base.bytes_to_id.get(b, -1) if b else -1 for b in tok.token_bytes]
        self.base_id = torch.tensor(base_ids, dtype=torch.long)  # -1: not in the base vocabulary
        self.has_pieces = self.mask.any(1)


@dataclass
class LMBatch:
    """One micro-batch for the LM loss: sampled-tokenizer ids and the vocabulary subset they are scored on."""

    ids: torch.Tensor  # [B, T] ids of the sampled tokenizer
    valid: torch.Tensor  # [B, T] real tokens (not padding)
    subset: torch.Tensor  # [S] sampled-tokenizer ids whose rows are predicted: batch tokens + negatives
    in_batch: torch.Tensor  # [S] which subset ids occur in the batch (the rest are random negatives)
    population: int  # tokens with pieces outside the batch (what the negatives stand for)


def make_lm_batch(pieces: TokenizerPieces, texts: list[str], seq_len: int, negatives: int,
                  gen: torch.Generator) -> LMBatch | None:
    """Tokenize `texts` with the sampled tokenizer, pad, and draw the negatives (None if nothing to
    predict)."""
    seqs = [ids[:seq_len] for ids in pieces.tok.encode_batch(texts)]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        return None
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        valid[row, : len(seq)] = True
    vocab_size = len(pieces.tok)
    extra = torch.randint(0, vocab_size, (negatives,), generator=gen)
    subset = torch.unique(torch.cat([ids[valid], extra]))
    subset = subset[pieces.has_pieces[subset]]
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[ids[valid]] = True
    population = int((pieces.has_pieces & ~seen).sum())
    return LMBatch(ids, valid, subset, seen[subset], population)


def _fvt_bias(bias: torch.Tensor, piece_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    maskf = mask.to(bias.dtype)
    return (bias[piece_ids] * maskf).sum(1) / maskf.sum(1).clamp_min(1.0)


def lm_loss(parts: LMParts, pieces: TokenizerPieces, batch: LMBatch, rows_in: torch.Tensor,
            rows_out: torch.Tensor, *, bos_id: int | None, predict_shared: bool) -> torch.Tensor:
    """Next-token cross-entropy of the frozen LM over the batch-vocabulary subset (see module docstring).

    `rows_in`/`rows_out` are the predicted rows of `batch.subset`, in its order."""
    device = rows_in.device
    dtype = parts.base_input.dtype
    subset = batch.subset.to(device)
    rows_in, rows_out = rows_in.to(dtype), rows_out.to(dtype)
    base_ids = pieces.base_id.to(device)[subset]
    shared = base_ids >= 0
    if not predict_shared:  # copy shared tokens, exactly as the `hypernet` init method does
        rows_in = torch.where(shared[:, None], parts.base_input[base_ids.clamp_min(0)], rows_in)
        out_src = parts.base_output if parts.base_output is not None else parts.base_input
        rows_out = torch.where(shared[:, None], out_src[base_ids.clamp_min(0)], rows_out)
    bias = None
    if parts.output_bias is not None:
        bias = _fvt_bias(parts.output_bias, pieces.ids.to(device)[subset], pieces.mask.to(device)[subset])
        bias = torch.where(shared, parts.output_bias[base_ids.clamp_min(0)], bias)

    local = torch.zeros(len(pieces.tok), dtype=torch.long, device=device)
    local[subset] = torch.arange(subset.numel(), device=device)
    ids, valid = batch.ids.to(device), batch.valid.to(device)
    keep = valid & pieces.has_pieces.to(device)[ids]
    local_ids = local[ids]
    attention = valid
    if bos_id is not None:  # BOS enters through the embedding module too (Gemma scales it like any row)
        rows_in = torch.cat([rows_in, parts.base_input[bos_id][None]])
        bos = torch.full((ids.shape[0], 1), subset.numel(), dtype=torch.long, device=device)
        local_ids = torch.cat([bos, local_ids], 1)
        attention = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
        targets, tmask = local[ids], keep
    else:
        targets, tmask = local[ids][:, 1:], keep[:, 1:]
    hidden = hidden_states(parts, embed(parts, rows_in, local_ids), attention)[:, :-1]
    logits = output_logits(parts, hidden[tmask], rows_out, bias).float()
    outside = ~batch.in_batch.to(device)
    n_outside = int(outside.sum())
    if n_outside:
        logits = logits + outside.float() * math.log(max(batch.population, n_outside) / n_outside)
    return F.cross_entropy(logits, targets[tmask])


def aux_loss(pred_in: torch.Tensor, pred_out: torch.Tensor, base_ids: torch.Tensor,
             parts: LMParts) -> torch.Tensor:
    """Normalised MSE + cosine distance of predicted rows of base tokens to their true rows."""
    ids = base_ids.to(pred_in.device)
    loss = _regression(pred_in.float(), parts.base_input[ids].float())
    if parts.base_output is not None:
        loss = loss + _regression(pred_out.float(), parts.base_output[ids].float())
    return loss


def _regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = (pred - target).pow(2).mean() / target.var().clamp_min(1e-8)
    return mse + (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
