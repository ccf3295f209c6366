"""Distillation data: documents, packing on both tokenizers, stitched alignments, deterministic sharded order."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distill.chat import plain_markup, template_markup
from distill.chunks import align_batch
from distill.data import DistillLoader, Packer, read_documents, split_text, stitch
from tests.conftest import BASE_CORPUS, DONOR_CORPUS
from transplant.assets import load_vocab
from transplant.errors import TransplantError

CHAT = [{"role": "user", "content": "Is the cat on the mat?"},
        {"role": "assistant", "content": "Yes: the cat sat on the mat. 12345"}]


@pytest.fixture(scope="module")
def vocabs(tiny_pair):
    return load_vocab(tiny_pair["base_tok"]), load_vocab(tiny_pair["donor_tok"])


def _chunk_bytes(ids: torch.Tensor, chunk_index: torch.Tensor, vocab, chunk: int) -> bytes:
    return b"".join(vocab.token_bytes[int(t)] for t in ids[chunk_index == chunk])


def _check_chunks(alignment, teacher, student) -> int:
    """Every chunk spells the same bytes on both sides; returns the number of chunks checked."""
    checked = 0
    for row in range(alignment.chunk_mask.shape[0]):
        for chunk in torch.nonzero(alignment.chunk_mask[row])[:, 0].tolist():
            t = _chunk_bytes(alignment.teacher_input_ids[row], alignment.teacher_chunk_index[row], teacher, chunk)
            s = _chunk_bytes(alignment.student_input_ids[row], alignment.student_chunk_index[row], student, chunk)
            assert t == s, (row, chunk, t, s)
            first, last = alignment.teacher_chunk_first[row, chunk], alignment.teacher_chunk_last[row, chunk]
            assert (alignment.teacher_chunk_index[row, first:last + 1] == chunk).all()
            checked += 1
    return checked


def test_split_text_cuts_at_paragraphs_and_keeps_every_byte():
    text = ("para one line\n" * 30 + "\n") * 20
    docs = split_text(text, doc_bytes=500)
    assert "".join(docs) == text
    assert len(docs) > 5 and all(d.endswith("\n\n") for d in docs[:-1])
    assert split_text("short", 500) == ["short"] and split_text("", 500) == []


def test_read_documents_txt_jsonl_dirs_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    lines = [json.dumps({"text": "a json text"}), json.dumps({"messages": CHAT}), ""]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    docs = read_documents([str(tmp_path)])
    assert docs == ["plain text file", "a json text", CHAT]
    (tmp_path / "bad.jsonl").write_text('{"neither": 1}\n')
    with pytest.raises(TransplantError, match="bad.jsonl:1"):
        read_documents([str(tmp_path / "bad.jsonl")])
    with pytest.raises(TransplantError, match="does not exist"):
        read_documents([str(tmp_path / "missing.txt")])


def test_packed_windows_fit_cover_the_text_and_align(vocabs):
    teacher, student = vocabs
    docs = split_text(BASE_CORPUS + DONOR_CORPUS, 700)
    packer = Packer(docs, teacher, student, max_length=48, seed=3, shuffle=False)
    stream = b""
    for _ in range(40):
        window = packer.next_window()
        assert sum(len(p.teacher_ids) for p in window) <= 48 and sum(len(p.student_ids) for p in window) <= 48
        alignment = stitch([window], teacher, student)
        assert _check_chunks(alignment, teacher, student) > 0
        # Both sides spell the same text: the stream of text bytes is the documents in order.
        t_bytes = b"".join(teacher.token_bytes[i] for p in window for i in p.teacher_ids)
        assert t_bytes == b"".join(student.token_bytes[i] for p in window for i in p.student_ids)
        stream += t_bytes
    assert stream == "".join(docs).encode()[: len(stream)] and len(stream) > 1000
    assert packer.state.doc_pos > 1  # several documents were packed


def test_stitch_of_single_pieces_equals_align_batch(vocabs):
    teacher, student = vocabs
    packer = Packer([BASE_CORPUS], teacher, student, max_length=40, pack=False)
    windows = [packer.next_window() for _ in range(3)]
    assert all(len(w) == 1 for w in windows)
    ours = stitch(windows, teacher, student)
    ref = align_batch([w[0].teacher_ids for w in windows], [w[0].student_ids for w in windows], teacher, student)
    for field in dataclasses.fields(ref):  # every field, so a field added to ChunkAlignment fails here first
        assert torch.equal(getattr(ours, field.name), getattr(ref, field.name)), field.name


def test_iteration_is_deterministic_and_resumes_from_state(vocabs):
    teacher, student = vocabs
    docs = split_text(BASE_CORPUS + DONOR_CORPUS, 400)

    def loader(prefetch=False):
        return DistillLoader(Packer(docs, teacher, student, max_length=32, seed=7), micro_batch_size=2,
                             prefetch=prefetch)

    first = loader()
    batches = [first.step_batches()[0] for _ in range(6)]
    second = loader(prefetch=True)  # the background thread runs ahead; the state must not
    for expected in batches[:3]:
        assert torch.equal(second.step_batches()[0].student_input_ids, expected.student_input_ids)
    state = second.state_dict()
    third = loader(prefetch=True)
    third.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    for expected in batches[3:]:
        got = third.step_batches()[0]
        assert torch.equal(got.student_input_ids, expected.student_input_ids)
    other_seed = DistillLoader(Packer(docs, teacher, student, max_length=32, seed=8), micro_batch_size=2)
    assert not torch.equal(other_seed.step_batches()[0].teacher_input_ids[:, :8], batches[0].teacher_input_ids[:, :8])


def test_epochs_reshuffle_and_continue(vocabs):
    teacher, student = vocabs
    docs = [f"document number {i}. " * 3 for i in range(6)]
    packer = Packer(docs, teacher, student, max_length=200, seed=1, pack=False)
    firsts = [packer.next_window() for _ in range(12)]
    assert packer.state.epoch == 2 or (packer.state.epoch == 1 and packer.state.doc_pos == 6)
    epoch0 = [tuple(w[0].teacher_ids) for w in firsts[:6]]
    epoch1 = [tuple(w[0].teacher_ids) for w in firsts[6:]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_ranks_share_the_global_batch_like_accumulation(vocabs):
    teacher, student = vocabs
    docs = split_text(BASE_CORPUS, 300)
    single = DistillLoader(Packer(docs, teacher, student, max_length=32), micro_batch_size=2, grad_accum=2)
    ranks = [DistillLoader(Packer(docs, teacher, student, max_length=32), micro_batch_size=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        accumulated = single.step_batches()
        for rank, loader in enumerate(ranks):
            assert torch.equal(loader.step_batches()[0].teacher_input_ids, accumulated[rank].teacher_input_ids)


def test_chat_markup_is_unaligned_and_content_is_aligned(vocabs):
    teacher, student = vocabs
    student.tokenizer.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>\n"
                                       "{% endfor %}")
    try:
        assert template_markup(student.tokenizer, CHAT) == ["<s>[user] ", "</s>\n<s>[assistant] ", "</s>\n"]
        assert template_markup(teacher.tokenizer, CHAT) is None
        assert plain_markup(CHAT) == ["user: ", "\n\nassistant: ", ""]
        for mode in ("auto", "plain", "student"):
            window = Packer([CHAT], teacher, student, max_length=128, chat_template=mode, pack=False).next_window()
            alignment = stitch([window], teacher, student)
            content = b"".join(teacher.token_bytes[i] for p in window if p.aligned for i in p.teacher_ids)
            assert content == b"Is the cat on the mat?Yes: the cat sat on the mat. 12345"
            assert _check_chunks(alignment, teacher, student) >= 10
            markup_positions = torch.cat([torch.full((len(p.student_ids),), not p.aligned) for p in window])
            assert (alignment.student_chunk_index[0][markup_positions] == -1).all()
            rendered = student.decode(alignment.student_input_ids[0].tolist())
            expected = "[assistant]" if mode in ("auto", "student") else "assistant: "
            assert expected in rendered
    finally:
        student.tokenizer.chat_template = None


def test_long_conversation_is_truncated_not_dropped(vocabs):
    teacher, student = vocabs
    long_chat = [{"role": "user", "content": BASE_CORPUS[:2000]}, {"role": "assistant", "content": "ok"}]
    window = Packer([long_chat, CHAT], teacher, student, max_length=64, shuffle=False).next_window()
    assert sum(len(p.teacher_ids) for p in window) <= 64
    assert any(p.aligned for p in window)
