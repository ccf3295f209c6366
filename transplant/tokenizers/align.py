"""Which tokens of the new vocabulary already exist in the base one.

Matching is an exact dictionary join on bytes (so SentencePiece `▁é`, GPT-2 `ĠÃ©` and tiktoken's raw bytes all
meet), and specials join on their literal text or, failing that, on their role (bos ↔ bos, eos ↔ eos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transplant.tokenizers.vocab import TURN_END_ROLES, TokenKind, Vocab, role_of_text


@dataclass
class Alignment:
    """new id -> base id for every shared token (-1 where the new token has no base counterpart)."""

    new_to_base: torch.Tensor  # LongTensor [len(new)]
    matched_by_role: dict[str, tuple[int, int]]  # role -> (new id, base id)
    identical: bool = False  # the new vocabulary is the base's own: every id keeps its row, nothing to repair

    @property
    def shared_mask(self) -> torch.Tensor:
        return self.new_to_base >= 0

    @property
    def shared_new_ids(self) -> torch.Tensor:
        return torch.nonzero(self.shared_mask, as_tuple=True)[0]

    @property
    def unshared_new_ids(self) -> torch.Tensor:
        """New-vocabulary ids that need an initialisation (not shared)."""
        return torch.nonzero(~self.shared_mask, as_tuple=True)[0]

    def stats(self, base_size: int) -> dict[str, int]:
        shared = int(self.shared_mask.sum())
        kept_base = int(torch.unique(self.new_to_base[self.shared_mask]).numel())
        return {
            "new_vocab_size": int(self.new_to_base.numel()),
            "base_vocab_size": base_size,
            "shared": shared,
            "new": int(self.new_to_base.numel()) - shared,
            "dropped": base_size - kept_base,
        }


def _role_partner(base: Vocab, role: str, taken: set[int]) -> int | None:
    """The base special that plays `role`, skipping rows that already end a turn or a document.

    A stop row shared by two new specials ties them in the output: the carried `<|im_end|>` of a base
    whose eos IS `<|im_end|>` (SmolLM2) would tie with the donor's `</s>`, and greedy decoding would end
    replies with the lower id, `</s>`, which transcripts and parsers do not look for. The donor's eos then
    takes the base's other document end (`<|endoftext|>`); a special with no free partner gets an
    initialised row."""
    candidates = [base.roles.get(role)] + [idx for idx, text in sorted(base.special_texts.items())
                                           if role_of_text(text) == role]
    return next((idx for idx in candidates if idx is not None and idx not in taken), None)


def same_vocabulary(base: Vocab, new: Vocab) -> bool:
    """Whether `new` is `base`'s own vocabulary: the same bytes, kinds and special texts at every id."""
    return (len(base) == len(new) and base.token_bytes == new.token_bytes and base.kinds == new.kinds
            and base.special_texts == new.special_texts)


def align(base: Vocab, new: Vocab) -> Alignment:
    """Join the two vocabularies on exact bytes (normal and byte-fallback tokens), then specials: a literal
    match first (Qwen's `<|endoftext|>` is SmolLM2's `<|endoftext|>`, although each tokenizer gives that role
    to a different token), then the role for specials whose literal the base does not have (`<bos>` ↔
    `<s>`). A model given its own vocabulary maps every id onto itself: the byte-fallback twins that the join
    would send to their normal token (`<0x31>` -> `1`) keep their own rows, so the model stays the same."""
    if same_vocabulary(base, new):
        return Alignment(new_to_base=torch.arange(len(new)), matched_by_role={}, identical=True)
    new_to_base = torch.full((len(new),), -1, dtype=torch.long)
    base_by_bytes = base.bytes_to_id
    for new_id, (piece, kind) in enumerate(zip(new.token_bytes, new.kinds)):
        if kind is not TokenKind.SPECIAL and piece:
            new_to_base[new_id] = base_by_bytes.get(piece, -1)
    base_special_by_text = {text: idx for idx, text in sorted(base.special_texts.items(), reverse=True)}
    for new_id, text in new.special_texts.items():
        if text in base_special_by_text:
            new_to_base[new_id] = base_special_by_text[text]
    matched_by_role: dict[str, tuple[int, int]] = {}
    stops = {int(new_to_base[i]) for role, i in new.roles.items()
             if role in TURN_END_ROLES and new.kinds[i] is TokenKind.SPECIAL and new_to_base[i] >= 0}
    for role in sorted(new.roles, key=lambda r: r != "eos"):  # eos first: it may take a stop row of its own
        new_id = new.roles[role]
        if new.kinds[new_id] is not TokenKind.SPECIAL or new_to_base[new_id] >= 0:
            continue
        base_id = _role_partner(base, role, taken=stops)
        if base_id is not None:
            new_to_base[new_id] = base_id
            matched_by_role[role] = (new_id, base_id)
            if role == "eos":
                stops.add(base_id)
    return Alignment(new_to_base=new_to_base, matched_by_role=matched_by_role)


def shared_token_fraction(alignment: Alignment, new: Vocab, text: str) -> float:
    """Fraction of the new tokenizer's tokens on `text` that are shared with the base vocabulary."""
    ids = torch.tensor(new.encode(text), dtype=torch.long)
    if ids.numel() == 0:
        return 0.0
    return float(alignment.shared_mask[ids].float().mean())
