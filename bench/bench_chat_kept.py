"""Chat kept: after a transplant and after healing on plain text, is the instruct base still a chat model?

    python bench/bench_chat_kept.py --make-answers    # once: bench/data/chat_teacher_answers.jsonl
    python bench/bench_chat_kept.py smollm2-135m out/smollm2-mistral-v3 out/heal-smollm2-mistral-v3-alm/final

The teacher (the original SmolLM2-135M-Instruct, `--teacher`) answers the fixed prompts of
`bench/data/chat_prompts.json` with its own chat template: greedy, seeded, at most 48 new tokens, stopping at
the template's end of turn (the generation config's EOS ids). The answers are a committed file, so every later
run scores against the same text. For each model (a dir or an offline alias) the script reports
* answer BPB: bits per UTF-8 byte of the teacher's answers, each rendered after its prompt in the scored
  model's own chat template, only the answer's tokens scored (`transplant.eval.chat`);
* first-20 agreement: the share of prompts whose greedy answer starts with the text of the teacher's first
  20 answer tokens (equals the whole answer when the teacher ended its turn within them). The target is the
  teacher's tokens' text, the same string for every model, so a coarse or fine tokenizer is neither helped nor
  hurt; the scored model generates until its text is longer than the target or it ends its turn.
The teacher scored against its own answers must agree on 100% (same greedy computation): a sanity check.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transplant.assets.sources import resolve_source  # noqa: E402
from transplant.errors import TransplantError  # noqa: E402
from transplant.eval.bpb import load_for_eval  # noqa: E402
from transplant.eval.chat import (  # noqa: E402
    AGREEMENT_TOKENS,
    agreement_target,
    agrees,
    conversation_answer_nats,
    render,
)

PROMPTS = REPO / "bench" / "data" / "chat_prompts.json"
ANSWERS = REPO / "bench" / "data" / "chat_teacher_answers.jsonl"
MAX_SCORED_TOKENS = 160  # a byte-level model may need several tokens per teacher token to cover the target


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the generation config's EOS (a transplant lists the carried `<|im_end|>` there)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def decoded_answer(tokenizer, prompt_ids: list[int], answer_ids: list[int]) -> str:
    """The answer's text as it reads after the prompt: decoding the answer ids alone would let a SentencePiece
    decoder drop the first token's leading space."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    head, whole = decode(prompt_ids), decode(prompt_ids + answer_ids)
    if not whole.startswith(head):
        raise TransplantError("the tokenizer decodes the prompt differently once an answer follows it; the "
                              "answer text cannot be cut out of the decode")
    return whole[len(head):]


class _LongerThan(StoppingCriteria):
    """Stops generation once the answer text is longer than `chars` (all the agreement rule needs)."""

    def __init__(self, tokenizer, prompt_ids: list[int], chars: int):
        self.tokenizer, self.prompt_ids, self.chars = tokenizer, prompt_ids, chars

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        answer = input_ids[0, len(self.prompt_ids):].tolist()
        done = len(decoded_answer(self.tokenizer, self.prompt_ids, answer)) > self.chars
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, *, max_new_tokens: int, stop_after_chars: int | None = None,
                  ) -> tuple[list[int], bool]:
    """Greedy answer ids up to (not including) the end of turn, and whether the turn ended; with
    `stop_after_chars`, generation stops once the answer text is longer than that."""
    prompt_ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    ends = eos_ids(model, tokenizer)
    stop = StoppingCriteriaList([_LongerThan(tokenizer, prompt_ids, stop_after_chars)]
                                if stop_after_chars else [])
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(ends),
                              pad_token_id=min(ends))  # plain greedy: a dir's own defaults (penalties) are
                              #                          ignored
    out = model.generate(torch.tensor([prompt_ids], device=device), generation_config=config,
                         stopping_criteria=stop,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device))
    answer = out[0, len(prompt_ids):].tolist()
    for i, token in enumerate(answer):
        if token in ends:
            return answer[:i], True
    return answer, False


def teacher_records(model, tokenizer, prompts: list[str], settings: dict) -> list[dict]:
    """One record per prompt: the greedy answer, and the agreement target cut from its first 20 tokens."""
    records = []
    for prompt in tqdm(prompts, desc="teacher answers"):
        prompt_ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        ids, ended = greedy_answer(model, tokenizer, prompt, max_new_tokens=settings["max_new_tokens"])
        answer = decoded_answer(tokenizer, prompt_ids, ids)
        first = decoded_answer(tokenizer, prompt_ids, ids[:AGREEMENT_TOKENS])
        target, complete = agreement_target(answer, first, ended and len(ids) < AGREEMENT_TOKENS)
        records.append({"prompt": prompt, "answer": answer, "answer_tokens": len(ids), "ended": ended,
                        "target20": target, "target20_complete": complete, **settings})
    return records


def make_answers(teacher: str, path: Path, max_new_tokens: int, seed: int) -> None:
    """Generate and store the teacher's answers (the file every later run scores against)."""
    model, tokenizer = load_for_eval(resolve_source(teacher, need_model=True).model_dir)
    torch.manual_seed(seed)
    settings = {"model": teacher, "decoding": "greedy", "seed": seed, "max_new_tokens": max_new_tokens,
                "dtype": "float32", "chat_template": "the teacher's, add_generation_prompt=True",
                "agreement_tokens": AGREEMENT_TOKENS}
    records = teacher_records(model, tokenizer, json.loads(PROMPTS.read_text()), settings)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} teacher answers to {path}")


def score(spec: str, records: list[dict]) -> dict:
    """Answer BPB and first-20 agreement of one model against the stored teacher answers."""
    started = time.perf_counter()
    model, tokenizer = load_for_eval(resolve_source(spec, need_model=True).model_dir)
    nats = answer_bytes = agreed = 0
    scored = [r for r in records if r["answer"]]
    if not scored:
        raise TransplantError("every teacher answer is empty; regenerate them with --make-answers")
    for record in tqdm(scored, desc=f"scoring {Path(spec).name}"):
        nats += conversation_answer_nats(model, tokenizer, record["prompt"], record["answer"])
        answer_bytes += len(record["answer"].encode("utf-8"))
        prompt_ids = tokenizer(render(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
        ids, _ = greedy_answer(model, tokenizer, record["prompt"], max_new_tokens=MAX_SCORED_TOKENS,
                               stop_after_chars=len(record["target20"]))
        agreed += agrees(decoded_answer(tokenizer, prompt_ids, ids), record["target20"],
                         record["target20_complete"])
    return {"model": spec, "answer_bpb": nats / math.log(2) / answer_bytes, "agreement": agreed / len(scored),
            "n": len(scored), "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    lines = ["| model | answer BPB | first-20 agreement | n | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['answer_bpb']:.3f} | {r['agreement']:.0%} | {r['n']} | "
              f"{r['seconds']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model dirs or offline aliases to score")
    parser.add_argument("--make-answers", action="store_true", help="(re)generate the teacher answers file")
    parser.add_argument("--teacher", default="smollm2-135m", help="the model whose answers are the reference")
    parser.add_argument("--answers", type=Path, default=ANSWERS)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        if args.make_answers:
            make_answers(args.teacher, args.answers, args.max_new_tokens, args.seed)
        if not args.models:
            return
        if not args.answers.exists():
            raise TransplantError(f"{args.answers} is missing; run with --make-answers first")
        records = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
        rows = [score(spec, records) for spec in args.models]
    except TransplantError as err:
        sys.exit(f"error: {err}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
