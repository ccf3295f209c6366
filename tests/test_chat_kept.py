"""Chat kept (`transplant.eval.chat`): the answer-only loss mask, the first-20 agreement rule, the refusal of
a tokenizer that loses text, on hand-made strings and a tiny ChatML model built here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import build_chatml_model
from transplant.errors import TransplantError
from transplant.eval.chat import (
    agreement_target,
    agrees,
    answer_nats,
    answer_span,
    answer_token_mask,
    conversation_answer_nats,
    render,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny ChatML model (byte-level BPE, so every text round-trips)."""
    return build_chatml_model(tmp_path_factory.mktemp("chat_kept"), seed=4)


def test_answer_span_and_mask_by_hand():
    prefix = "<u>What?</u>\n<a>"
    rendered = prefix + " It is 56.</a>\n"
    span = answer_span(rendered, prefix, " It is 56.")
    assert span == (16, 26) and rendered[span[0]:span[1]] == " It is 56."
    # tokens: "<a>" | ">\n " straddles the start | "It" | " is" | " 56." | ".</a>" straddles the end |
    # zero-width
    offsets = [(13, 16), (15, 17), (17, 19), (19, 22), (22, 25), (25, 30), (26, 26)]
    assert answer_token_mask(offsets, span) == [False, True, True, True, True, True, False]


def test_answer_span_falls_back_to_the_last_occurrence_and_refuses_a_missing_answer():
    rendered = "<u>yes</u><a>yes</a>"  # a template that does not start with the prefix we were given
    assert answer_span(rendered, "<other>", "yes") == (13, 16)
    with pytest.raises(TransplantError, match="verbatim"):
        answer_span(rendered, "<other>", "no")
    with pytest.raises(TransplantError, match="empty answer"):
        answer_span(rendered, "<u>yes</u><a>", "")


def test_answer_nats_sums_only_the_masked_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]))
    ids = torch.tensor([0, 1, 0])
    assert answer_nats(logits, ids, [False, True, False]) == pytest.approx(-math.log(0.5))
    assert answer_nats(logits, ids, [False, True, True]) == pytest.approx(-math.log(0.5) - math.log(0.25))
    with pytest.raises(TransplantError, match="no context"):
        answer_nats(logits, ids, [True, True, False])


def test_agreement_rule_by_hand():
    # the teacher's 20 tokens cut a UTF-8 character: the decode ends in U+FFFD, the target stops before it
    assert agreement_target("Café au lait, s'il vous plaît", "Caf\ufffd", ended=False) == ("Caf", False)
    target, complete = agreement_target("Paris.", "Paris.", ended=True)
    assert (target, complete) == ("Paris.", True)
    assert agrees("Paris.", target, complete)
    assert not agrees("Paris. It is in France.", target, complete)  # the teacher stopped; the model must too
    assert not agrees("Paris", target, complete)
    long_target, long_complete = agreement_target("The capital of France is Paris, a",
                                                  "The capital of", False)
    assert agrees("The capital of Spain", long_target, long_complete)
    assert not agrees("The capitol", long_target, long_complete)


def test_conversation_loss_is_the_answer_tokens_loss(chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    prompt, answer = "the cat sat", "The catalog of cats"
    nats = conversation_answer_nats(model, tokenizer, prompt, answer)
    rendered, prefix = render(tokenizer, prompt, answer), render(tokenizer, prompt)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    head = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    tail = len(tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert ids[:head] == tokenizer(prefix, add_special_tokens=False)["input_ids"]  # the answer starts a token
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], dim=-1)
    by_hand = -sum(float(logprobs[i - 1, ids[i]]) for i in range(head, len(ids) - tail))
    assert nats == pytest.approx(by_hand, rel=1e-5)


def test_refuses_a_tokenizer_that_loses_text(chat_model, tmp_path):
    """A lower-casing normaliser: the model would never have to predict the capitals."""
    from tokenizers import normalizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    with pytest.raises(TransplantError, match="does not reproduce the text"):
        conversation_answer_nats(model, tokenizer, "the cat sat", "The Catalog")


def test_refuses_a_tokenizer_without_chat_template(tiny_pair):
    from transformers import AutoTokenizer

    with pytest.raises(TransplantError, match="no chat template"):
        render(AutoTokenizer.from_pretrained(tiny_pair["base_tok"]), "hello")


def test_bench_scores_a_model_against_its_own_answers(chat_model):
    """The bench's sanity check on a tiny model: its own greedy answers agree 100%, and the answer BPB is the
    summed answer loss over the answers' bytes."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("bench_chat_kept", ROOT / "bench" / "bench_chat_kept.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    prompts = ["the cat sat", "print(add(2, 3))", "Numbers: 12345"]
    records = bench.teacher_records(model, tokenizer, prompts, {"max_new_tokens": 24})
    assert all(r["answer"] for r in records) and all(len(r["target20"]) <= len(r["answer"]) for r in records)
    row = bench.score(str(chat_model), records)
    assert row["agreement"] == 1.0 and row["n"] == 3
    nats = sum(conversation_answer_nats(model, tokenizer, r["prompt"], r["answer"]) for r in records)
    answer_bytes = sum(len(r["answer"].encode()) for r in records)
    assert row["answer_bpb"] == pytest.approx(nats / math.log(2) / answer_bytes, rel=1e-5)
    other = [{**r, "target20": "zz" + r["target20"], "target20_complete": False} for r in records]
    assert bench.score(str(chat_model), other)["agreement"] == 0.0
