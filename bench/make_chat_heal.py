"""Build the chat part of the smoke recipe's healing corpus: the instruct teacher's own greedy answers to
prompts that are *not* the chat-kept benchmark's (`bench/data/chat_prompts.json`).

Why: the transplant costs the instruct model its chat behaviour (RESULTS, "Chat kept": 100% -> 10% first-20
agreement) and plain-text healing does not bring it back. Distilling on conversations the teacher itself
answers (sequence-level distillation, rendered with each side's chat template by `distill`) shows the student
the turn structure and the teacher's answers. The prompts are built here from templates over topics chosen
apart from the benchmark's; the script refuses to write if any prompt equals a benchmark prompt or shares its
first four words with one.

    python bench/make_chat_heal.py                        # -> recipes/data/chat_heal.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chat_kept import PROMPTS, decoded_answer, eos_ids  # noqa: E402

from transplant.assets.sources import resolve_source  # noqa: E402
from transplant.eval.bpb import load_for_eval  # noqa: E402
from transplant.eval.chat import render  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "recipes" / "data" / "chat_heal.jsonl"

FACTS = ["a volcano", "a rainbow", "gravity", "an eclipse", "a glacier", "a desert", "electricity",
         "a magnet", "the heart", "a vaccine", "a telescope", "an atom", "a comet", "a hurricane",
         "a battery", "friction",
         "a fossil", "the moon's phases", "a bridge", "a bicycle", "democracy", "inflation", "a library",
         "a recipe", "an orchestra", "a marathon", "a museum", "a passport", "a spreadsheet", "a password"]
FACTS += ["a waterfall", "a coral reef", "a thunderstorm", "an earthquake", "a tide", "a cloud", "snow",
          "fog", "a seed", "a mushroom", "a honeybee", "a penguin", "an elephant", "a whale", "a bat",
          "a dinosaur",
          "the lungs", "the skeleton", "a muscle", "sleep", "a fever", "a microscope", "a compass", "a clock",
          "a calendar", "a map", "a lighthouse", "a canal", "a dam", "a tunnel", "a skyscraper", "a castle",
          "a pyramid", "a submarine", "a helicopter", "a rocket", "a satellite", "a solar panel",
          "a wind turbine", "a refrigerator", "a microwave oven", "a printer", "a keyboard", "the internet",
          "an email", "a search engine", "a robot", "a loan", "a budget", "a tax", "an election", "a court",
          "a newspaper", "a poem", "a novel", "a symphony", "a painting", "a sculpture", "a festival",
          "a volunteer", "a habit"]
TASKS = ["Explain {x} in two sentences.", "What is {x}?", "Give one interesting fact about {x}.",
         "Describe {x} to a ten-year-old."]
ADVICE = ["staying focused while studying", "saving money each month", "learning a new language",
          "keeping houseplants alive", "running a first 5 km race", "writing a clear email",
          "preparing for a job interview", "cooking rice", "packing for a long flight", "making new friends",
          "organising a small desk", "starting a vegetable garden", "taking better photos with a phone",
          "reducing screen time", "giving a short speech", "learning to swim", "baking bread",
          "keeping a diary", "choosing a laptop", "caring for a puppy", "learning chess", "painting a room",
          "planning a birthday party", "studying for a maths exam", "riding a bike in traffic",
          "meditating", "reading more books", "drinking less coffee", "waking up early", "learning to type",
          "making a budget", "cleaning a kitchen", "writing a short story", "camping for the first time",
          "learning to play the guitar"]
ADVICE_TASKS = ["Give me two tips for {x}.", "How should a beginner approach {x}?"]
WRITING = ["Write a two-line poem about the sea.", "Write a short birthday message for a friend.",
           "Describe a busy market in one sentence.", "Write a one-sentence story about a lost key.",
           "Write a limerick about a sleepy dog.", "Describe the smell of fresh bread.",
           "Write a short apology for arriving late.", "Invent a name for a new ice cream flavour.",
           "Write a slogan for a bicycle shop.", "Describe a snowy street at night in one sentence.",
           "Write a short note inviting a neighbour to dinner.", "Describe a thunderstorm in two sentences."]
MATH = [f"What is {a} times {b}?" for a, b in [(6, 9), (12, 4), (11, 11), (3, 14), (25, 4)]] + \
       [f"What is {a} minus {b}?" for a, b in [(50, 18), (100, 37), (81, 9), (64, 30)]] + \
       [f"What is {a} percent of {b}?" for a, b in [(10, 250), (50, 86), (25, 40)]] + \
       ["How many minutes are in three hours?", "How many days are in a leap year?",
        "What is the next number: 2, 4, 8, 16?", "Round 3.76 to one decimal place.",
        "How many centimeters are in 2.5 meters?", "Is 21 an even number?"]
CODE = ["How do I check the length of a string in Python?", "In Python, how do I get the larger of two "
        "numbers?", "What does the `return` statement do?", "How do I sort a list of "
        "numbers in Python?", "What is a dictionary in Python?", "Write a for loop in Python that sums a "
        "list.", "What is a boolean?", "How do I convert a string to an integer in Python?",
        "What does `git commit` do?", "What is an API?", "Define a Python function that checks whether a "
        "number is even.", "What is recursion?", "How do I create an empty set in Python?",
        "What does CSS stand for?", "How do `=` and `==` differ in Python?"]
EDIT = ["Rewrite more simply: The aforementioned documentation requires revision.",
        "Make this sentence more exciting: We went to the park.",
        "Fix the spelling: I recieved the pakage yesterday.",
        "Rewrite in the future tense: She plays the piano.",
        "Make this a command: You should close the window.",
        "Shorten to one sentence: The bus was late, so we walked, and we still arrived on time.",
        "Translate to Spanish: Thank you very much.", "Translate to German: Where is the train station?",
        "Give a synonym for 'happy'.", "Give the opposite of 'ancient'.",
        "Combine into one sentence: It rained. We stayed inside.",
        "Rewrite without jargon: We need to leverage our synergies."]
CHAT = ["Hello! How are you today?", "Can you recommend a good book for a long train ride?",
        "What should I cook for dinner tonight?", "I feel tired. Any advice?",
        "What is a good hobby to start this year?", "Can you tell me a riddle?",
        "What games can children play indoors?", "How can I be more productive in the morning?",
        "Tell me something that will make me smile.", "What is a fun way to learn geography?"]


def prompts() -> list[str]:
    """The training prompts, in a fixed shuffled order (seed 0)."""
    built = [t.format(x=x) for x, t in itertools.product(FACTS, TASKS)]
    built += [t.format(x=x) for x, t in itertools.product(ADVICE, ADVICE_TASKS)]
    built += WRITING + MATH + CODE + EDIT + CHAT
    random.Random(0).shuffle(built)
    return built


def check_apart(train: list[str], held: list[str]) -> None:
    """Refuse prompts that repeat a benchmark prompt (exactly, or in its first four words)."""
    def head(p: str) -> str:
        return " ".join(p.lower().split()[:4])
    heads = {head(p): p for p in held}
    clash = [p for p in train if p in held or head(p) in heads]
    if clash:
        raise SystemExit(f"{len(clash)} training prompts repeat chat-kept prompts, e.g. {clash[0]!r}; "
                         "change them")


def batched_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of several prompts at once (left padding; measured here 0.39 s per prompt in batches of
    32 against 3.3 s one by one), cut at the first end of turn."""
    ends = sorted(eos_ids(model, tokenizer))
    rows = [tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[ends[0]] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=ends,
                              pad_token_id=ends[0])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=config)
    answers = []
    for prompt_ids, new in zip(rows, out[:, width:].tolist()):
        cut = next((i for i, t in enumerate(new) if t in ends), len(new))
        answers.append(decoded_answer(tokenizer, prompt_ids, new[:cut]).strip())
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="prompts generated together (left-padded)")
    args = parser.parse_args(argv)
    train = prompts()
    check_apart(train, json.loads(PROMPTS.read_text()))
    torch.manual_seed(0)
    model, tokenizer = load_for_eval(resolve_source(args.teacher, need_model=True).model_dir)
    lines = []
    for start in tqdm(range(0, len(train), args.batch), desc="teacher answers (batches)"):
        batch = train[start:start + args.batch]
        for prompt, answer in zip(batch, batched_greedy(model, tokenizer, batch, args.max_new_tokens)):
            lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(args.out)
    print(f"wrote {len(lines)} teacher conversations to {args.out}")


if __name__ == "__main__":
    main()
