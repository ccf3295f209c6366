"""Teacher agreement on held-out text: how far the student's chunk likelihoods are from the teacher's.

Bits per byte says how well the student models text; it does not say whether it models it *like the teacher*.
A student can pass the teacher on a slice by fitting the training corpus (domain learning), which no loss
whose fixed point is the teacher can do. Agreement measures the thing healing is for, the same way for every
loss: the teacher and the student read the same bytes, each with its own tokenizer; aligned chunks (same byte
span on both sides, `distill.chunks`) get each side's log-likelihood (the sum of its tokens' log-probs); and

    disagreement = sum over valid chunks |log L_teacher - log L_student| / ln 2 / bytes of those chunks,

in bits per byte (0 = the student assigns every chunk the teacher's likelihood; lower is better). It is not
ALM's training loss (no temperature, no merging, no binarisation), so it does not favour ALM by construction.
The teacher's side is computed once per slice and kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.chunks import ChunkAlignment
from distill.corpus import split_text
from distill.data import Packer, stitch
from distill.losses.common import alm_valid_chunks, chunk_sums, token_logprobs
from transplant.tokenizers.vocab import Vocab


@dataclass
class AgreementSlice:
    alignment: ChunkAlignment  # the held-out text as aligned windows, both sides
    valid: torch.Tensor  # bool [B, C]: chunks complete on both sides with no token at position 0
    num_bytes: torch.Tensor  # float [B, C]: bytes of each chunk (0 where invalid)
    teacher_logl: torch.Tensor | None = None  # float [B, C]: the teacher's chunk log-likelihoods, once
    #                                           computed


def heldout_alignment(text: str, teacher: Vocab, student: Vocab, max_length: int) -> AgreementSlice:
    """The whole `text` packed into windows of at most `max_length` tokens per side, aligned into chunks."""
    packer = Packer(split_text(text), teacher, student, max_length=max_length, shuffle=False)
    windows = []
    while packer.state.epoch == 0:
        windows.append(packer.next_window())
    alignment = stitch(windows, teacher, student)
    valid = alm_valid_chunks(alignment)
    nbytes = (alignment.chunk_byte_end - alignment.chunk_byte_start).float() * valid
    return AgreementSlice(alignment, valid, nbytes)


@torch.no_grad()
def chunk_loglik(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 chunk_index: torch.Tensor, num_chunks: int, batch_size: int = 4) -> torch.Tensor:
    """float [B, C]: per chunk, the sum of its tokens' log-probs under `model` (rows in batches, so a
    262k-vocabulary teacher's logits never exist for the whole slice at once)."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        logits = model(input_ids=ids,
                       attention_mask=attention_mask[start:start + batch_size].to(device)).logits
        logp = token_logprobs(logits, ids).float()
        rows.append(chunk_sums(logp, chunk_index[start:start + batch_size].to(device), num_chunks).cpu())
    return torch.cat(rows)


def disagreement_bits_per_byte(teacher_logl: torch.Tensor, student_logl: torch.Tensor, valid: torch.Tensor,
                               num_bytes: torch.Tensor) -> float:
    """sum_valid |log L_t - log L_s| / ln 2 / sum_valid bytes (module docstring)."""
    gap = ((teacher_logl - student_logl).abs() * valid).sum()
    return float(gap / math.log(2) / num_bytes.sum().clamp(min=1))


def teacher_agreement(student: torch.nn.Module, teacher: torch.nn.Module,
                      slices: dict[str, AgreementSlice]) -> dict[str, float]:
    """{slice: disagreement in bits/byte} of `student` against `teacher`; fills each slice's teacher side
    once."""
    results = {}
    for name, piece in slices.items():
        a = piece.alignment
        if piece.teacher_logl is None:
            piece.teacher_logl = chunk_loglik(teacher, a.teacher_input_ids, a.teacher_attention_mask,
                                              a.teacher_chunk_index, a.num_chunks)
        student_logl = chunk_loglik(student, a.student_input_ids, a.student_attention_mask,
                                    a.student_chunk_index, a.num_chunks)
        results[name] = disagreement_bits_per_byte(piece.teacher_logl, student_logl, piece.valid,
                                                   piece.num_bytes)
    return results


__all__ = ["AgreementSlice", "chunk_loglik", "disagreement_bits_per_byte", "heldout_alignment",
           "teacher_agreement"]
