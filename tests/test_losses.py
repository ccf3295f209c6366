"""Distillation losses on hand-computed cases (a few tokens and chunks, expected values written out)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from distill.chunks import align_batch, boundary_mask, word_start_mask
from distill.losses import LOSSES, PairContext, available_losses, get_loss, loss_options
from distill.losses.common import chunk_sums
from distill.losses.hidden import channel_normalised_mse, projection_modules
from distill.losses.mined import levenshtein_pairs, mined_mapping
from distill.losses.units import boundary_units, debias_mode, likelihood_units
from tests.test_chunks import ids_of, make_vocab
from transplant.errors import TransplantError


def logits_for(vocab_size: int, rows: list[dict[int, float]]) -> torch.Tensor:
    """[1, T, V] logits whose softmax puts the given probabilities on the given ids (rest spread evenly)."""
    out = torch.empty(1, len(rows), vocab_size, dtype=torch.float64)
    for t, probs in enumerate(rows):
        rest = (1.0 - sum(probs.values())) / (vocab_size - len(probs))
        out[0, t] = math.log(rest)
        for idx, p in probs.items():
            out[0, t, idx] = math.log(p)
    return out


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def probs_to_logits(rows: list[list[float]]) -> torch.Tensor:
    """[1, T, V] logits from full probability rows (each row sums to 1)."""
    probs = torch.tensor([rows], dtype=torch.float64)
    assert torch.allclose(probs.sum(-1), torch.ones(1, len(rows), dtype=torch.float64))
    return probs.log()


@pytest.fixture
def abc_case():
    """Text "abc": teacher [bos, "ab", "c"], student [bos, "a", "b", "c"]; chunks ab | c (bos is in none).

    Teacher: p("ab") = 0.5, p("c" | ab) = 0.8. Student: p("a") = 0.5, p("b" | a) = 0.5, p("c" | ab) = 0.8.
    """
    teacher = make_vocab([b"a", b"b", b"ab", b"c"], specials=("bos",))
    student = make_vocab([b"a", b"b", b"c"], specials=("bos",))
    t = ids_of(teacher, "bos", b"ab", b"c")
    s = ids_of(student, "bos", b"a", b"b", b"c")
    alignment = align_batch([t], [s], teacher, student)
    teacher_logits = logits_for(len(teacher), [{t[1]: 0.5}, {t[2]: 0.8}, {}])
    student_logits = logits_for(len(student), [{s[1]: 0.5}, {s[2]: 0.5}, {s[3]: 0.8}, {}])
    return {"alignment": alignment, "teacher_logits": teacher_logits,
            "student_logits": student_logits.requires_grad_(),
            "teacher_boundary_mask": boundary_mask(teacher), "student_boundary_mask": boundary_mask(student)}


def test_registry():
    assert {"alm", "alm-l1", "ce", "uld", "mined"} <= set(available_losses())  # found through entry points
    assert get_loss("alm") is LOSSES["alm"]
    with pytest.raises(TransplantError, match="unknown distillation loss"):
        get_loss("nope")


def test_ce_by_hand():
    vocab = make_vocab([b"x", b"y", b"z"], specials=())
    ids = ids_of(vocab, b"x", b"x", b"z")
    alignment = align_batch([ids], [ids], vocab, vocab)
    # position 0: p = [0.5, 0.25, 0.25] -> next "x" costs ln 2; position 1: uniform -> next "z" costs ln 3
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [1.0, 1.0, 1.0]]]))
    batch = {"alignment": alignment, "student_logits": logits}
    loss, metrics = get_loss("ce")(batch)
    assert loss.item() == pytest.approx((math.log(2) + math.log(3)) / 2)
    assert metrics["num_items_local"].item() == 2 == get_loss("ce").count_items(batch)
    assert get_loss("ce")(batch, num_items=4)[0].item() == pytest.approx(math.log(6) / 4)


def test_alm_binary_ce_by_hand(abc_case):
    loss, metrics = get_loss("alm")(abc_case, temperature=1.0, debias="none")
    # chunk "ab": p_t = 0.5, p_s = 0.25 -> -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.5 ln(16/3)
    # chunk "c":  p_t = p_s = 0.8 -> binary entropy H(0.8); the bos chunk sits at position 0 and is skipped
    expected = (0.5 * math.log(16 / 3) + binary_entropy(0.8)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["num_items_local"].item() == 2 == get_loss("alm").count_items(abc_case)


def test_alm_l1_and_binary_kl_by_hand(abc_case):
    loss, _ = get_loss("alm-l1")(abc_case, temperature=2.0, debias="none")
    # |ln .5 - ln .25| / tau / 2
    assert loss.item() == pytest.approx((math.log(0.5) - math.log(0.25)) / 2 / 2)
    loss, _ = get_loss("alm")(abc_case, temperature=1.0, diff="binary_kl", debias="none")
    kl_ab = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert loss.item() == pytest.approx(kl_ab / 2, rel=1e-9)


def test_alm_gradient_reaches_student_only(abc_case):
    abc_case["teacher_logits"] = abc_case["teacher_logits"].clone().requires_grad_()
    # sorted rows that differ in shape at every chunk end (equal shapes give ULD no gradient)
    abc_case["student_logits"] = torch.tensor([[[.5, .2, .2, .1], [.2, .5, .2, .1], [.1, .1, .7, .1],
                                                [.6, .2, .1, .1]]],
                                              dtype=torch.float64).log().requires_grad_()
    for name in ("alm", "alm-l1", "uld"):
        abc_case["student_logits"].grad = None
        loss, _ = get_loss(name)(abc_case)
        loss.backward()
        assert abc_case["teacher_logits"].grad is None
        assert abc_case["student_logits"].grad.abs().sum() > 0


def test_alm_identical_models_are_at_the_minimum():
    vocab = make_vocab([b"a", b"b", b" c", b"d"], specials=("bos",))
    ids = ids_of(vocab, "bos", b"a", b" c", b"b", b"d", b"a")
    alignment = align_batch([ids], [ids], vocab, vocab)
    torch.manual_seed(0)
    logits = torch.randn(1, len(ids), len(vocab), dtype=torch.float64)
    student = logits.clone().requires_grad_()
    batch = {"alignment": alignment, "teacher_logits": logits, "student_logits": student,
             **get_loss("alm").prepare(PairContext(vocab, vocab,
                                                   loss_options("alm", {})))}  # default debias: merge
    for temperature in (1.0, 100.0):
        loss, _ = get_loss("alm")(batch, temperature=temperature)
        (grad,) = torch.autograd.grad(loss, student)
        assert grad.abs().max().item() < 1e-9  # stationary point: matched likelihoods
        worse = get_loss("alm")({**batch, "student_logits": student + 0.3 * torch.randn_like(logits)},
                                temperature=temperature)[0]
        assert worse.item() > loss.item()
        assert (get_loss("alm")(batch, temperature=temperature, diff="binary_kl")[0].item()
                == pytest.approx(0, abs=1e-12))


def test_alm_whitespace_debias_by_hand():
    """Legacy `debias: whitespace`. Text "ab c": teacher [ab, " c"], student [a, b, " c"]; chunk "ab" is
    followed by whitespace.

    Teacher: p(ab) = .5, p(" c" | ab) = .5. Student: p(a) = p(b | a) = .5, p(" c" | ab) = .25.
    Debiased chunk "ab": teacher .5 * .5, student .25 * .25 -> |ln .25 - ln .0625| = ln 4;
    chunk " c" ends the text (no debias): |ln .5 - ln .25| = ln 2.  L1 at tau 1: (ln 4 + ln 2) / 2.
    """
    teacher = make_vocab([b"a", b"ab", b" c"], specials=("bos",))
    student = make_vocab([b"a", b"b", b" c"], specials=("bos",))
    t, s = ids_of(teacher, "bos", b"ab", b" c"), ids_of(student, "bos", b"a", b"b", b" c")
    batch = {
        "alignment": align_batch([t], [s], teacher, student),
        "teacher_logits": logits_for(len(teacher), [{t[1]: 0.5}, {t[2]: 0.5}, {}]),
        "student_logits": logits_for(len(student), [{s[1]: 0.5}, {s[2]: 0.5}, {s[3]: 0.25}, {}]),
        "teacher_word_start_mask": word_start_mask(teacher),
        "student_word_start_mask": word_start_mask(student),
    }
    plain, _ = get_loss("alm-l1")(batch, temperature=1.0, debias="none")
    assert plain.item() == pytest.approx(math.log(2))
    debiased, _ = get_loss("alm-l1")(batch, temperature=1.0, debias="whitespace")
    assert debiased.item() == pytest.approx(1.5 * math.log(2))


@pytest.fixture
def boundary_case():
    """Text "ab c": teacher [bos, "ab", " c"], student [bos, "a", "b", " c"]; chunks "ab" | " c".

    Vocabularies (ids): teacher a ab " c" bos eos, student a b " c" bos eos; boundary tokens: " c", bos, eos.
    Teacher rows:  after bos   .2 .5 .1 .1 .1   P(ab) = .5
                   after ab    .1 .1 .6 .1 .1   P(" c") = .6, P(boundary) = .6 + .1 + .1 = .8
                   after " c"  .25 .25 .1 .2 .2  P(boundary) = .5
    Student rows:  after bos   .5 .2 .1 .1 .1   P(a) = .5
                   after a     .2 .5 .1 .1 .1   P(b) = .5
                   after b     .3 .2 .3 .1 .1   P(" c") = .3, P(boundary) = .5
                   after " c"  .2 .2 .2 .2 .2   P(boundary) = .6
    """
    teacher = make_vocab([b"a", b"ab", b" c"], specials=("bos", "eos"))
    student = make_vocab([b"a", b"b", b" c"], specials=("bos", "eos"))
    t, s = ids_of(teacher, "bos", b"ab", b" c"), ids_of(student, "bos", b"a", b"b", b" c")
    return {
        "alignment": align_batch([t], [s], teacher, student),
        "teacher_logits": probs_to_logits([[.2, .5, .1, .1, .1], [.1, .1, .6, .1, .1],
                                           [.25, .25, .1, .2, .2]]),
        "student_logits": probs_to_logits([[.5, .2, .1, .1, .1], [.2, .5, .1, .1, .1], [.3, .2, .3, .1, .1],
                                           [.2, .2, .2, .2, .2]]).requires_grad_(),
        **get_loss("alm").prepare(PairContext(student, teacher, alm_options(debias="merge"))),
    }


def test_alm_merge_debias_by_hand(boundary_case):
    # threshold .1: the teacher's P(boundary) after "ab" is .8 > .1, so each chunk is its own unit, and each
    # unit gets its side's log P(boundary) appended:
    #   "ab":  teacher .5 * .8 = .4,  student .25 * .5 = .125;   " c": teacher .6 * .5 = .3,  student .3 * .6
    #   = .18
    l1 = (math.log(.4 / .125) + math.log(.3 / .18)) / 2
    loss, metrics = get_loss("alm-l1")(boundary_case, temperature=1.0)  # debias=merge is the default
    assert loss.item() == pytest.approx(l1, rel=1e-9) and metrics["num_units"].item() == 2
    assert get_loss("alm-l1")(boundary_case, temperature=1.0, debias="append")[0].item() == pytest.approx(l1)
    # threshold .85: .8 does not close the unit, "ab" + " c" merge; only the unit end gets P(boundary):
    #   teacher .5 * .6 * .5 = .15, student .25 * .3 * .6 = .045. The mean is over merged units (1, as the
    #   reference); per=chunks divides by the 2 chunks before merging (this project's first version).
    loss, metrics = get_loss("alm-l1")(boundary_case, temperature=1.0, boundary_threshold=0.85)
    assert loss.item() == pytest.approx(math.log(.15 / .045), rel=1e-9) and metrics["num_units"].item() == 1
    by_chunks, _ = get_loss("alm-l1")(boundary_case, temperature=1.0, boundary_threshold=0.85, per="chunks")
    assert by_chunks.item() == pytest.approx(math.log(.15 / .045) / 2, rel=1e-9)
    # global normalisation: a micro-batch holding 2 of 4 global chunks gets half its unit mean
    half, _ = get_loss("alm-l1")(boundary_case, num_items=4.0, temperature=1.0, boundary_threshold=0.85)
    assert half.item() == pytest.approx(math.log(.15 / .045) / 2, rel=1e-9)
    with pytest.raises(TransplantError, match="per"):
        get_loss("alm-l1")(boundary_case, temperature=1.0, per="tokens")
    # none: raw chunks |ln .5 - ln .25| + |ln .6 - ln .3|
    assert (get_loss("alm-l1")(boundary_case, temperature=1.0, debias="none")[0].item()
            == pytest.approx(math.log(2)))
    # binary CE on the merged units at tau 1 (the default difference)
    loss, _ = get_loss("alm")(boundary_case, temperature=1.0)
    expected = sum(-(pt * math.log(ps) + (1 - pt) * math.log(1 - ps))
                   for pt, ps in ((.4, .125), (.3, .18))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()  # the student's P(boundary) is trained too: its last row gets a gradient
    assert boundary_case["student_logits"].grad[0, 3].abs().sum() > 0


def test_alm_debias_options_are_checked(boundary_case):
    assert debias_mode(True) == "merge" and debias_mode(False) == "none" and debias_mode("append") == "append"
    with pytest.raises(TransplantError, match="debias='spaces' is unknown"):
        debias_mode("spaces")
    with pytest.raises(TransplantError, match="merge_threshold"):
        get_loss("alm")(boundary_case, merge_threshold=0.5)


def test_boundary_units_close_at_threshold_gaps_and_invalid_chunks():
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    logb = torch.tensor([[0.0, -3.0, -0.5, -3.0, -3.0, -3.0, -3.0]])  # P(boundary) e^-3 ~ .05, e^-.5 ~ .61
    adjacent = torch.tensor([[True, True, True, True, False, True, False]])
    units = boundary_units(valid, logb, adjacent, threshold=0.1)
    # chunk 0 invalid; 1 + 2 merge (2 crosses .1); 3 + 4 merge until the gap after 4; 5 + 6 to the row end
    assert units.tolist() == [[-1, 1, 1, 2, 2, 3, 3]]


def test_likelihood_units_merge_by_teacher_likelihood():
    probs = torch.tensor([[0.9, 0.8, 0.5, 0.9, 0.3, 0.95, 0.99]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, True, False, True, True]])
    group = likelihood_units(probs.log(), valid, math.log(0.6))
    # .9 * .8 = .72 > .6 keeps going, * .5 = .36 closes; .9 alone is cut by the invalid chunk; .95 * .99 open
    # at end
    assert group.tolist() == [[0, 0, 0, 1, -1, 2, 2]]


def test_alm_with_likelihood_merging_sums_groups(abc_case):
    loss, metrics = get_loss("alm-l1")(abc_case, temperature=1.0, merge_threshold=0.9, debias="none")
    # threshold .9: "ab" alone (.5 <= .9), "c" alone -> same as unmerged
    assert loss.item() == pytest.approx(math.log(2) / 2)
    assert metrics["num_units"].item() == 2
    # with threshold .4 both chunks merge: teacher .5 * .8, student .25 * .8 -> |ln .4 - ln .2| = ln 2 over 1
    # unit
    loss, metrics = get_loss("alm-l1")(abc_case, temperature=1.0, merge_threshold=0.4, debias="none")
    assert metrics["num_units"].item() == 1
    assert loss.item() == pytest.approx(math.log(2))


def test_alm_hidden_state_term_by_hand(abc_case):
    b, tt = abc_case["alignment"].student_input_ids.shape[0], abc_case["alignment"].teacher_input_ids.shape[1]
    student_hidden = torch.ones(b, 4, 2, dtype=torch.float64)  # projected to 0 by the zero projection
    teacher_hidden = torch.zeros(b, tt, 3, dtype=torch.float64)
    teacher_hidden[0, 1] = torch.tensor([1.0, 2.0, 2.0])  # end of chunk "ab" on the teacher side
    teacher_hidden[0, 2] = torch.tensor([1.0, 0.0, 2.0])  # end of chunk "c"
    batch = {**abc_case, "student_hidden_states": student_hidden, "teacher_hidden_states": teacher_hidden}
    with pytest.raises(TransplantError, match="hidden_projection"):
        get_loss("alm")(batch, hidden_weight=1.0, debias="none")
    projection = torch.nn.Linear(2, 3).double()
    torch.nn.init.zeros_(projection.weight)
    torch.nn.init.zeros_(projection.bias)
    base, _ = get_loss("alm")(abc_case, temperature=1.0, debias="none")
    loss, metrics = get_loss("alm")({**batch, "hidden_projection": projection}, temperature=1.0,
                                    hidden_weight=0.5, debias="none")
    # teacher second moment per channel over the two chunk ends: [1, 2, 4]; errors (0 - t)^2 / m2:
    # "ab" [1, 2, 1] -> mean 4/3, "c" [1, 0, 1] -> 2/3; sum 2 over 2 items = 1, weighted .5
    assert metrics["hidden_mse"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(base.item() + 0.5)
    loss.backward()
    assert projection.weight.grad.abs().sum() > 0 and projection.bias.grad.abs().sum() > 0


def alm_options(**options):
    """ALM's options as the trainer hands them to a loss: typed and complete (`loss_options`)."""
    return loss_options("alm", {"alm": options})


def test_channel_normalisation_and_projection_modules():
    teacher = torch.tensor([[100.0, 1.0], [-100.0, 1.0]])
    # a channel 100x larger weighs the same: halving both channels' error gives the same normalised loss
    assert channel_normalised_mse(teacher * 0.5, teacher).item() == pytest.approx(2 * 0.25)
    vocab = make_vocab([b"a"])
    made = projection_modules(PairContext(vocab, vocab, alm_options(**{"hidden_weight": 1.0}), 32, 48))
    assert isinstance(made["hidden_projection"], torch.nn.Linear)
    assert made["hidden_projection"].weight.shape == (48, 32)
    assert projection_modules(PairContext(vocab, vocab, alm_options(**{"hidden_weight": 1.0}), 32, 32)) == {}
    assert "hidden_projection" in projection_modules(
        PairContext(vocab, vocab,
                    alm_options(**{"hidden_weight": 1.0, "hidden_projection": "always"}), 32, 32))
    assert projection_modules(PairContext(vocab, vocab, alm_options(**{"hidden_weight": 0.0}), 32, 48)) == {}
    with pytest.raises(TransplantError, match="hidden_projection='maybe'"):
        projection_modules(PairContext(vocab, vocab,
                                       {**alm_options(hidden_weight=1.0),
                                        "hidden_projection": "maybe"}, 3, 4))


def test_uld_by_hand():
    teacher = make_vocab([b"a", b"b"], specials=())  # 2 + padded to 3 below
    student = make_vocab([b"a", b"b", b"c", b"d"], specials=())
    t, s = ids_of(teacher, b"a", b"b"), ids_of(student, b"a", b"b")
    alignment = align_batch([t], [s], teacher, student)
    teacher_logits = torch.log(torch.tensor([[[0.2, 0.5, 0.3], [1.0, 1.0, 1.0]]]))
    student_logits = torch.log(torch.tensor([[[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]]))
    batch = {"alignment": alignment, "teacher_logits": teacher_logits, "student_logits": student_logits}
    loss, metrics = get_loss("uld")(batch)
    # chunk "a": sorted [.5 .3 .2 0] vs [.6 .2 .1 .1] -> .1 + .1 + .1 + .1 = .4
    # chunk "b": [1/3 1/3 1/3 0] vs [.25 .25 .25 .25] -> 3 * (1/12) + .25 = .5
    assert metrics["uld"].item() == pytest.approx((0.4 + 0.5) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(1.5 * (0.4 + 0.5) / 2, rel=1e-6)  # the paper's lambda = 1.5
    assert metrics["num_items_local"].item() == 2
    assert (get_loss("uld")(batch, top_k=1, weight=1.0)[0].item()
            == pytest.approx((0.1 + 1 / 12) / 2, rel=1e-6))


def test_baselines_carry_their_papers_ce_weights():
    # ULD: 1.0 * CE + 1.5 * ULD (Boizard et al.); MinED: 0.9 * CE + 0.1 * fusion (FuseLLM); CE and ALM: none
    assert (get_loss("uld").ce_weight, get_loss("mined").ce_weight) == (1.0, 0.9)
    assert get_loss("ce").ce_weight == 0.0
    # ALM as the reference runs tokenizer transfer: CE + ALM, GradMag-weighted; the baselines sum
    assert (get_loss("alm").ce_weight, get_loss("alm").balance) == (1.0, "gradmag")
    assert get_loss("uld").balance == get_loss("mined").balance == "sum"


def test_mined_mapping_and_loss_by_hand():
    teacher = make_vocab([b"cat", b"dog", b" cat", b"x"], specials=("bos", "eos"))
    student = make_vocab([b"cat", b"cats", b" dog", b"zzzzzz"], specials=("eos", "bos", "pad"))
    mapping = mined_mapping(student, teacher)
    # cat = exact; cats -> cat (1 deletion); " dog" -> dog (space variant); zzzzzz -> nearest by ED then
    # length specials by role; pad has no partner
    # (all teacher tokens are 6 edits away from zzzzzz; " cat" has the smallest length gap)
    assert mapping.tolist() == [0, 0, 1, 2, 5, 4, -1]
    t, s = ids_of(teacher, "bos", b"cat"), ids_of(student, "bos", b"cat")
    batch = {
        "alignment": align_batch([t], [s], teacher, student),
        "mined_mapping": mapping,
        # at the chunk "cat" (position 1 on both sides): teacher p(dog) = .5, p(eos) = .3, others .05 each
        "teacher_logits": logits_for(len(teacher), [{}, {1: 0.5, 5: 0.3}]),
        "student_logits": torch.zeros(1, 2, len(student), dtype=torch.float64, requires_grad=True),
    }
    loss, metrics = get_loss("mined")(batch)
    assert loss.item() == pytest.approx(0.1 * metrics["mined"].item())  # FuseLLM: (1 - lambda) = .1
    # q over student ids: cat .05, cats .05, " dog" .5, zzzzzz .05, eos .3, bos .05, pad 0 -> sum 1.0;
    # student uniform over 7: KL = sum q ln(q * 7)
    q = [0.05, 0.05, 0.5, 0.05, 0.3, 0.05]
    expected = sum(p * math.log(p * 7) for p in q)
    # bos is in no chunk, so chunk 0 is "cat"
    loss_cat_only = get_loss("mined")({**batch, "alignment": _only_chunk(batch["alignment"], 0)},
                                      weight=1.0)[0]
    assert loss_cat_only.item() == pytest.approx(expected, rel=1e-9)
    assert loss.item() > 0
    loss.backward()
    assert batch["student_logits"].grad.abs().sum() > 0


def _only_chunk(alignment, chunk: int):
    keep = torch.zeros_like(alignment.chunk_mask)
    keep[:, chunk] = alignment.chunk_mask[:, chunk]
    return type(alignment)(**{**vars(alignment), "chunk_mask": keep})


def _levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_levenshtein_pairs_matches_reference():
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abc ") for _ in range(rng.randint(0, 9))) for _ in range(300)]
    left, right = words[:150], words[150:]
    assert levenshtein_pairs(left, right).tolist() == [_levenshtein(a, b) for a, b in zip(left, right)]
    assert levenshtein_pairs(left, right, block=7).tolist() == levenshtein_pairs(left, right).tolist()


def test_mined_mapping_exact_when_window_covers_vocab():
    rng = random.Random(2)
    pool = sorted({bytes(rng.choice(b"abcde ") for _ in range(rng.randint(1, 6))) for _ in range(60)})
    teacher = make_vocab(pool[:30], specials=())
    student = make_vocab(pool[30:], specials=())
    mapping = mined_mapping(student, teacher, window=100).tolist()
    for sid, piece in enumerate(student.token_bytes):
        best = min(_levenshtein(piece, t) for t in teacher.token_bytes)
        assert _levenshtein(piece, teacher.token_bytes[mapping[sid]]) == best


def test_chunk_sums_equal_dense_matmul(abc_case):
    alignment = abc_case["alignment"]
    values = torch.randn(alignment.student_chunk_index.shape, dtype=torch.float64)
    dense = torch.einsum("bt,btc->bc", values, alignment.student_token_to_chunk.double())
    assert torch.allclose(chunk_sums(values, alignment.student_chunk_index, alignment.num_chunks), dense)


def test_num_items_normalises_globally(abc_case):
    for name in ("alm", "alm-l1", "uld", "ce"):
        local, metrics = get_loss(name)(abc_case)
        scaled, _ = get_loss(name)(abc_case, num_items=10)
        assert scaled.item() * 10 == pytest.approx(local.item() * metrics["num_items_local"].item())


@pytest.mark.slow
def test_all_losses_on_a_real_pair():
    """llama3 teacher, mistral-v3 student (SentencePiece, dummy prefix, byte fallback), random logits."""
    from distill.chunks import tokenize_pair
    from transplant.assets import load_vocab

    teacher, student = load_vocab("llama3"), load_vocab("mistral-v3")
    texts = ["Hello world, this is a test.\n  def f(x):\n\treturn x", "Über café 日本語 🙂👍🏽 done."]
    pairs = [tokenize_pair(x, teacher, student, 64, add_eos=True) for x in texts]
    alignment = align_batch([p.teacher_ids for p in pairs], [p.student_ids for p in pairs], teacher, student)
    mapping = mined_mapping(student, teacher)
    assert mapping[student.bytes_to_id[b" world"]] == teacher.bytes_to_id[b" world"]
    assert mapping[student.roles["eos"]] == teacher.roles["eos"]
    torch.manual_seed(0)
    t_len, s_len = alignment.teacher_input_ids.shape[1], alignment.student_input_ids.shape[1]
    batch = {
        "alignment": alignment,
        "teacher_logits": torch.randn(2, t_len, len(teacher)),
        "student_logits": torch.randn(2, s_len, len(student) + 64, requires_grad=True),  # padded vocab
        "teacher_boundary_mask": boundary_mask(teacher),
        "student_boundary_mask": boundary_mask(student),
        "mined_mapping": mapping,
    }
    options = {"alm": {"debias": "merge"}, "uld": {"top_k": 256}}
    for name in available_losses():
        batch["student_logits"].grad = None
        loss, metrics = get_loss(name)(batch, **options.get(name, {}))
        assert torch.isfinite(loss) and loss.item() > 0, name
        assert metrics["num_items_local"].item() == get_loss(name).count_items(batch) > 0
        loss.backward()
        assert batch["student_logits"].grad.abs().sum() > 0, name


def test_gradmag_weights_equalise_unit_directions_by_hand():
    from distill.losses.balance import balanced_step, gradmag_weights

    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    output = weight @ torch.tensor([1.0, 1.0])  # the "model output" [1, 2]; d output / d weight is known
    leaf = output.detach().requires_grad_()
    big, small = 3.0 * leaf.sum(), (leaf * torch.tensor([1.0, -1.0])).sum()  # |g| = 3*sqrt2 and sqrt2
    surrogate, value, weights = balanced_step([big, small], [leaf], [output])
    # 1/|g| normalised: (1/3) / (1/3 + 1), 1 / (1/3 + 1)
    assert weights.tolist() == pytest.approx([0.25, 0.75])
    assert float(value) == pytest.approx(0.25 * 9.0 + 0.75 * -1.0)
    surrogate.backward()
    # d/d output of sum_i w_i loss_i = 0.25*[3, 3] + 0.75*[1, -1] = [1.5, 0]; through W (input [1, 1]):
    assert weight.grad.flatten().tolist() == pytest.approx([1.5, 1.5, 0.0, 0.0], abs=1e-6)
    # scaling every loss by c scales the combined gradient by c (global item counts keep their meaning)
    leaf2 = output.detach().requires_grad_()
    _, _, weights2 = balanced_step([30.0 * leaf2.sum(), 10 * (leaf2 * torch.tensor([1.0, -1.0])).sum()],
                                   [leaf2], [output])
    assert weights2.tolist() == pytest.approx([0.25, 0.75])
    # a loss with no gradient (no valid chunk) gets no weight; all-zero falls back to uniform
    assert gradmag_weights(torch.tensor([0.0, 2.0])).tolist() == [0.0, 1.0]
    assert gradmag_weights(torch.tensor([0.0, 0.0])).tolist() == [0.5, 0.5]
    leaf3 = output.detach().requires_grad_()
    _, _, weights3 = balanced_step([torch.zeros((), requires_grad=True) * 1.0, leaf3.sum()],
                                   [leaf3], [output])
    assert weights3.tolist() == [0.0, 1.0]
    # a loss's own parameters (ALM's hidden projection) get w_i * d loss_i / d param through the surrogate
    projection = torch.tensor(2.0, requires_grad=True)
    output4 = weight @ torch.tensor([1.0, 1.0])
    leaf4 = output4.detach().requires_grad_()
    surrogate4, _, weights4 = balanced_step([(projection * leaf4).sum(), 3.0 * leaf4.sum()], [leaf4],
                                            [output4], through_losses=True)
    surrogate4.backward()
    assert float(projection.grad) == pytest.approx(float(weights4[0]) * 3.0)  # leaf4 sums to 1 + 2


def test_gradmag_block_probe_equals_the_gradient_at_the_last_block():
    """`gradmag_at: block` (the reference): the probe's norms equal |d loss / d last block| taken directly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.losses.balance import BlockProbe, balanced_step

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    probe = BlockProbe(model)
    ids = torch.randint(0, 50, (2, 7))
    logits = model(input_ids=ids).logits
    recomputed = probe.logits()
    assert probe.usable and probe.check(recomputed, logits)
    leaf = logits.detach().requires_grad_()
    ce = torch.nn.functional.cross_entropy(leaf[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    other = 1e-3 * leaf.square().mean()
    block = list(model.model.layers[-1].parameters())
    direct = []
    for term in (ce, other):
        surrogate = (logits * torch.autograd.grad(term, leaf, retain_graph=True)[0]).sum()
        grads = torch.autograd.grad(surrogate, block, retain_graph=True)
        direct.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    _, _, weights = balanced_step([ce, other], [leaf], [logits],
                                  norms_from=lambda grads: probe.norms(grads, recomputed))
    expected = torch.stack(direct)
    assert torch.allclose(weights, (1 / expected) / (1 / expected).sum(), rtol=1e-4)
    _, _, at_logits = balanced_step([ce, other], [leaf], [logits])
    assert not torch.allclose(weights, at_logits, rtol=1e-2)  # the two places weigh differently
