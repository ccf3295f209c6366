"""Is a transplanted or healed instruct model still a chat model? Two tokenizer-fair measures against a
teacher's answers (the harness is `bench/bench_chat_kept.py`).

* Answer bits per byte: each (prompt, teacher answer) conversation is rendered with the scored model's *own*
  chat template, so every model sees its own markers, and only the answer is scored. The answer is located
  in the rendered text by characters (`answer_span`), tokens are assigned to it by their character offsets
  (`answer_token_mask`: a token that straddles the boundary, e.g. SmolLM2's `ĊĠ` = template newline + the
  answer's first space, counts to the answer, so every answer byte is predicted by some scored token), and the
  summed loss of those tokens is divided by the answer's UTF-8 bytes. The end-of-turn marker is not scored:
  it is a special token whose spelling differs between tokenizers and has no text bytes to divide by. A
  tokenizer that loses bytes of the rendered text (or maps them to unknown tokens) is refused, as bits per
  byte would flatter it (`transplant.eval.bpb.check_fidelity`; an inserted byte, such as the prefix space a
  SentencePiece tokenizer puts after a special token, loses nothing).
* First-20-tokens agreement (`agreement_target`, `agrees`): the target is the text of the *teacher's* first
  20 answer tokens, the same string for every model scored, so the test does not get easier or harder with
  the scored tokenizer's granularity (comparing a fixed number of the scored model's own tokens would ask a
  byte-level model for a few characters and a large-vocabulary one for many). A model agrees when its greedy
  answer starts with that text; when the teacher ended its turn within those 20 tokens, the target is the
  whole answer and the model must end its turn there too (its answer equals the target).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from transplant.errors import TransplantError
from transplant.eval.bpb import check_fidelity, tokenizer_fidelity

AGREEMENT_TOKENS = 20


def answer_span(rendered: str, prefix: str, answer: str) -> tuple[int, int]:
    """Character span of `answer` in the `rendered` conversation. `prefix` is the same conversation without
    the answer, rendered with the generation prompt: templates put the answer right after it. A template
    that rewrites content (e.g. trims it) falls back to the last occurrence of the answer, which is the last
    message; an answer not rendered verbatim cannot be scored."""
    if not answer:
        raise TransplantError("an empty answer has no bytes to score; regenerate the teacher answers")
    if rendered.startswith(prefix) and rendered.startswith(answer, len(prefix)):
        return len(prefix), len(prefix) + len(answer)
    start = rendered.rfind(answer)
    if start < 0:
        raise TransplantError(f"the chat template does not render the answer {answer[:40]!r} verbatim; "
                              "score a model whose template keeps message content as it is")
    return start, start + len(answer)


def answer_token_mask(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[bool]:
    """Which tokens (character `offsets` from the tokenizer) belong to the answer `span`: every token whose
    characters overlap it, so a token straddling a boundary counts to the answer; zero-width tokens never
    do."""
    start, end = span
    return [s < end and e > start and e > s for s, e in offsets]


def answer_nats(logits: torch.Tensor, ids: torch.Tensor, mask: Sequence[bool]) -> float:
    """Summed negative log-likelihood (nats) of the masked tokens of one sequence, each predicted from the
    logits of the position before it (`logits` [T, V], `ids` [T])."""
    if mask and mask[0]:
        raise TransplantError("the answer starts the rendered conversation, so its first token has no "
                              "context; use a chat template that puts the prompt before the answer")
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, ids[1:, None])[:, 0]
    keep = torch.tensor(list(mask[1:]), dtype=torch.bool)
    return -float(logprobs[keep].sum())


def render(tokenizer, prompt: str, answer: str | None = None) -> str:
    """The conversation as `tokenizer`'s chat template writes it: with the answer, or up to the generation
    prompt when `answer` is None."""
    if not getattr(tokenizer, "chat_template", None):
        raise TransplantError("the tokenizer has no chat template, so it is not a chat model; score a model "
                              "dir whose tokenizer_config.json carries one")
    messages = [{"role": "user", "content": prompt}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}],
                                         tokenize=False)


@torch.no_grad()
def conversation_answer_nats(model, tokenizer, prompt: str, answer: str) -> float:
    """Nats the model spends on `answer` as the reply to `prompt`, in its own chat template (module docs)."""
    rendered = render(tokenizer, prompt, answer)
    span = answer_span(rendered, render(tokenizer, prompt), answer)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    check_fidelity(tokenizer_fidelity(tokenizer, rendered, ids), "a rendered conversation")
    mask = answer_token_mask(encoded["offset_mapping"], span)
    tensor = torch.tensor([ids], device=next(model.parameters()).device)
    return answer_nats(model(input_ids=tensor).logits[0].cpu(), tensor[0].cpu(), mask)


def agreement_target(answer: str, first_tokens_text: str, ended: bool) -> tuple[str, bool]:
    """The teacher's first-20-tokens text and whether it is the whole answer. `first_tokens_text` is the
    decode of those tokens; a byte-level token cut inside a UTF-8 character decodes to U+FFFD there, so the
    target is its longest common prefix with the full answer."""
    n = 0
    while n < min(len(answer), len(first_tokens_text)) and answer[n] == first_tokens_text[n]:
        n += 1
    target = answer[:n]
    return target, ended and target == answer


def agrees(model_answer: str, target: str, complete: bool) -> bool:
    """The agreement rule (module docs): the model's greedy answer starts with the target text, and equals
    it when the target is the teacher's whole answer."""
    return model_answer == target if complete else model_answer.startswith(target)
