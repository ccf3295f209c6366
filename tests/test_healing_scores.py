"""Healing scores (distill.scores) and teacher agreement (distill.agreement), by hand and on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from distill.agreement import disagreement_bits_per_byte, heldout_alignment, teacher_agreement
from distill.corpus import source_names
from distill.scores import (
    format_mean_spread,
    format_run_healing,
    gap_closed_capped,
    group_mean,
    is_tie,
    mean_spread,
    overshoot,
    pooled_gap_closed,
    run_healing,
    slice_groups,
)
from tests.conftest import BASE_CORPUS


def test_gap_closed_is_capped_at_the_teacher_and_overshoot_is_its_own_column():
    # start 1.2, teacher 1.0: halfway = 50%; reaching the teacher = 100%; passing it still 100%, overshoot
    # apart
    assert gap_closed_capped(1.2, 1.1, 1.0) == pytest.approx(0.5)
    assert gap_closed_capped(1.2, 1.0, 1.0) == pytest.approx(1.0)
    assert gap_closed_capped(1.2, 0.7, 1.0) == pytest.approx(1.0)
    assert overshoot(0.7, 1.0) == pytest.approx(0.3) and overshoot(1.1, 1.0) == 0.0
    assert gap_closed_capped(1.2, 1.3, 1.0) == pytest.approx(-0.5)  # worse than the start counts in full
    assert math.isnan(gap_closed_capped(0.9, 0.8, 1.0))  # the teacher is not better: nothing to heal towards


def test_pooled_gap_closed_weighs_slices_by_their_gap():
    # gaps 0.1 and 0.9 bits/byte: closing 100% of the small one and 0% of the big one pools to 10%, not 50%;
    # a slice past the teacher counts its gap only; one where the teacher is worse is left out
    rows = [(1.1, 0.9, 1.0), (2.0, 2.0, 1.1), (0.8, 0.7, 0.9)]
    assert pooled_gap_closed(rows) == pytest.approx(0.1)
    assert math.isnan(pooled_gap_closed([(0.8, 0.7, 0.9)]))


def test_slices_group_by_training_source_and_groups_average_what_they_have():
    groups = slice_groups(["english", "code", "python-docs", "spanish"], ["english", "code", "german"])
    assert groups == {"in-domain": ["english", "code"], "untrained": ["python-docs", "spanish"]}
    values = {"english": 0.6, "code": 0.8, "python-docs": 0.2, "spanish": math.nan}
    assert group_mean(values, groups["in-domain"]) == pytest.approx(0.7)
    assert group_mean(values, groups["untrained"]) == pytest.approx(0.2)  # NaN slice skipped
    assert math.isnan(group_mean(values, ["german"]))


def test_one_run_is_scored_from_its_metrics_records():
    # step 0 carries the teacher; english is trained on (its tail is in-domain), python-docs and spanish not
    history = [
        {"step": 0, "eval_bpb_english": 1.2, "eval_bpb_python-docs": 1.5, "eval_bpb_spanish": 2.6,
         "eval_bpb_all": 1.7, "teacher_bpb_english": 1.0, "teacher_bpb_python-docs": 1.1,
         "teacher_bpb_spanish": 2.0},
        {"step": 5, "loss": 3.0},
        {"step": 10, "eval_bpb_english": 0.9, "eval_bpb_python-docs": 1.4, "eval_bpb_spanish": 2.4,
         "eval_bpb_all": 1.5, "eval_disagree_python-docs": 0.3, "eval_disagree_spanish": 0.5,
         "eval_disagree_english": 0.1},
    ]
    trained = source_names(["texts:english", "texts:code", "/data/german.txt"])
    assert trained == ["english", "code", "german"]
    summary = run_healing(history, trained)
    # untrained pooled: (0.1 + 0.2) / (0.4 + 0.6) = 30%; english passes the teacher: 100%, overshoot 0.1
    assert summary["gap_closed_untrained"] == pytest.approx(0.3)
    assert summary["gap_closed_in_domain"] == pytest.approx(1.0)
    assert summary["overshoot_in_domain"] == pytest.approx(0.1)
    assert summary["disagree_untrained"] == pytest.approx(0.4)  # english's 0.1 is not in the untrained mean
    line = format_run_healing(history, trained)
    assert "untrained sources (python-docs, spanish) 30.0%" in line and "in-domain (english) 100.0%" in line
    assert run_healing(history[1:], trained) == {} and format_run_healing(history[:1], trained) == ""


def test_seed_spread_and_ties():
    assert mean_spread([0.4, 0.5, 0.6]) == pytest.approx((0.5, 0.1))
    assert mean_spread([0.4]) == (0.4, 0.0)
    assert is_tie([0.40, 0.45, 0.50], [0.48, 0.50, 0.52])  # 0.45 ± 0.05 overlaps 0.50 ± 0.02
    assert not is_tie([0.30, 0.31, 0.32], [0.48, 0.50, 0.52])
    assert format_mean_spread([0.4, 0.5, 0.6], percent=True) == "50.0% ± 10.0"
    assert format_mean_spread([math.nan]) == "n/a"


def test_disagreement_by_hand():
    # two valid chunks of 3 and 5 bytes, log-likelihood gaps ln 2 and 3 ln 2; the third chunk is invalid
    teacher = torch.tensor([[-1.0, -2.0, -9.0]])
    student = teacher - torch.tensor([[math.log(2), -3 * math.log(2), 100.0]])
    valid = torch.tensor([[True, True, False]])
    nbytes = torch.tensor([[3.0, 5.0, 0.0]])
    assert disagreement_bits_per_byte(teacher, student, valid, nbytes) == pytest.approx((1 + 3) / 8)


def test_a_model_agrees_with_itself_and_not_with_another(tiny_pair):
    from transformers import AutoModelForCausalLM

    from transplant.assets import load_vocab

    vocab = load_vocab(tiny_pair["base_tied"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["base_tied"]).eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_pair["base_untied"]).eval()
    text = BASE_CORPUS[-600:]
    slices = {"tail": heldout_alignment(text, vocab, vocab, max_length=64)}
    assert int(slices["tail"].valid.sum()) > 10
    assert teacher_agreement(model, model, slices)["tail"] == pytest.approx(0.0, abs=1e-6)
    assert slices["tail"].teacher_logl is not None  # the teacher's side is kept for the next evaluation
    assert teacher_agreement(other, model, slices)["tail"] > 0.01  # two random tiny models: near-uniform, yet
    #                                                                apart
