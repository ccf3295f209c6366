"""Distillation data: documents, packing on both tokenizers, stitched alignments, deterministic sharded
order."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pytest
import torch

from distill.chat import plain_markup, template_markup, token_spans
from distill.chunks import align_batch
from distill.corpus import open_corpus
from distill.data import (
    DistillLoader,
    Packer,
    WindowIndex,
    read_documents,
    shared_window_index,
    split_text,
    stitch,
)
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
            t = _chunk_bytes(alignment.teacher_input_ids[row], alignment.teacher_chunk_index[row],
                             teacher, chunk)
            s = _chunk_bytes(alignment.student_input_ids[row], alignment.student_chunk_index[row],
                             student, chunk)
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
    with pytest.raises(TransplantError, match="bad.jsonl .line at byte 0. has neither"):
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
    ref = align_batch([w[0].teacher_ids for w in windows], [w[0].student_ids for w in windows],
                      teacher, student)
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
    assert not torch.equal(other_seed.step_batches()[0].teacher_input_ids[:, :8],
                           batches[0].teacher_input_ids[:, :8])


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
    ranks = [DistillLoader(Packer(docs, teacher, student, max_length=32), micro_batch_size=2, rank=r,
                           world_size=2)
             for r in range(2)]
    for _ in range(3):
        accumulated = single.step_batches()
        for rank, loader in enumerate(ranks):
            assert torch.equal(loader.step_batches()[0].teacher_input_ids,
                               accumulated[rank].teacher_input_ids)


def test_chat_markup_is_unaligned_and_content_is_aligned(vocabs):
    teacher, student = vocabs
    student.tokenizer.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>\n"
                                       "{% endfor %}")
    try:
        assert template_markup(student.tokenizer, CHAT) == ["<s>[user] ", "</s>\n<s>[assistant] ", "</s>\n"]
        assert template_markup(teacher.tokenizer, CHAT) is None
        assert plain_markup(CHAT) == ["user: ", "\n\nassistant: ", ""]
        for mode in ("auto", "plain", "student"):
            window = Packer([CHAT], teacher, student, max_length=128, chat_template=mode,
                            pack=False).next_window()
            alignment = stitch([window], teacher, student)
            shared = [b"".join(teacher.token_bytes[i] for i in p.teacher_ids) for p in window if p.aligned]
            # one shared piece per message, inside its content (a token straddling markup and content, like
            # " Is" after "user:", is markup: the piece starts at the first offset both sides start a token)
            assert len(shared) == 2 and all(piece in m["content"].encode() for piece, m in zip(shared, CHAT))
            assert shared[1].endswith(b"12345") and sum(map(len, shared)) > 40
            assert _check_chunks(alignment, teacher, student) >= 10
            markup_positions = torch.cat([torch.full((len(p.student_ids),), not p.aligned) for p in window])
            assert (alignment.student_chunk_index[0][markup_positions] == -1).all()
            rendered = student.decode(alignment.student_input_ids[0].tolist())
            expected = "[assistant]" if mode in ("auto", "student") else "assistant: "
            assert expected in rendered
    finally:
        student.tokenizer.chat_template = None


@pytest.fixture(scope="module")
def sp_vocab(tmp_path_factory):
    """A SentencePiece BPE (dummy prefix, byte fallback, [INST]/[/INST] control symbols) trained in the
    test."""
    from tests.test_vocab import train_sentencepiece

    return load_vocab(train_sentencepiece(tmp_path_factory.mktemp("sp"), "chat"))


MISTRAL_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ "
                "m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("sp_side", ["student", "teacher"])
def test_chat_is_tokenized_once_per_side_as_at_use(vocabs, sp_vocab, sp_side):
    """A conversation is rendered and tokenized once per side: the window holds exactly the ids the model gets
    at use (SentencePiece: no dummy prefix before every turn, only where the tokenizer itself puts one), and
    the contents found by byte offsets are aligned chunks that spell the same bytes on both sides."""
    byte_level = vocabs[0]
    teacher, student = (byte_level, sp_vocab) if sp_side == "student" else (sp_vocab, byte_level)
    sp_vocab.tokenizer.chat_template = MISTRAL_LIKE
    try:
        chat = CHAT + [{"role": "user", "content": "And the dog?"},
                       {"role": "assistant", "content": "Asleep."}]
        window = Packer([chat], teacher, student, max_length=256, pack=False).next_window()
        rendered = sp_vocab.tokenizer.apply_chat_template(chat, tokenize=False)
        sp_ids = [i for p in window for i in (p.student_ids if sp_side == "student" else p.teacher_ids)]
        assert sp_ids == sp_vocab.encode(rendered)  # starts with <s>: the template renders it
        plain = "\n\n".join(f"{m['role']}: {m['content']}" for m in chat)
        bl_ids = [i for p in window for i in (p.teacher_ids if sp_side == "student" else p.student_ids)]
        assert bl_ids == [byte_level.roles["bos"]] + byte_level.encode(plain)  # no template: plain, bos added
        # "[INST]Is": the SentencePiece side's first content token carries a phantom space ("▁I" spells "I")
        aligned = [p for p in window if p.aligned]
        phantoms = [p.student_phantom if sp_side == "student" else p.teacher_phantom for p in aligned]
        assert len(aligned) == 4 and phantoms[0] is True
        alignment = stitch([window], teacher, student)
        text_bytes = {"teacher": [], "student": []}
        for p in aligned:
            for name, ids, phantom, vocab in (("teacher", p.teacher_ids, p.teacher_phantom, teacher),
                                              ("student", p.student_ids, p.student_phantom, student)):
                spelled = b"".join(vocab.token_bytes[i] for i in ids)
                text_bytes[name].append(spelled[1:] if phantom else spelled)
        assert text_bytes["teacher"] == text_bytes["student"]
        assert all(piece in m["content"].encode() for piece, m in zip(text_bytes["teacher"], chat))
        assert text_bytes["teacher"][0] == b"Is the cat on the mat?"
        assert alignment.chunk_mask.sum() >= 10
    finally:
        sp_vocab.tokenizer.chat_template = None


def test_token_spans_map_specials_phantoms_and_stop_at_a_mismatch(sp_vocab):
    text = "<s>[INST]Is it?[/INST] Yes"
    ids = sp_vocab.encode(text)
    spans = token_spans(ids, sp_vocab, text.encode())
    assert spans.mapped == len(ids)
    pieces = [text.encode()[a:b] for a, b in zip(spans.starts.tolist(), spans.ends.tolist())]
    assert pieces[:2] == [b"<s>", b"[INST]"] and b"".join(pieces) == text.encode()
    assert spans.phantom.tolist().count(True) >= 1 and spans.phantom[2]  # after [INST]: "▁I" spells "I"
    with_bos = [sp_vocab.roles["bos"]] + sp_vocab.encode("Is it?")
    spans = token_spans(with_bos, sp_vocab, b"Is it?")  # a prepended bos spans nothing
    assert spans.ends[0] == 0 and spans.mapped == len(with_bos) and spans.phantom[1]
    assert token_spans(sp_vocab.encode("Is it?"), sp_vocab, b"Was it?").mapped == 0


def test_packed_documents_start_with_bos_in_no_chunk(vocabs):
    teacher, student = vocabs
    docs = split_text(BASE_CORPUS + DONOR_CORPUS, 60)
    window = Packer(docs, teacher, student, max_length=200, shuffle=False).next_window()
    assert len(window) >= 2  # several documents in one sequence
    alignment = stitch([window], teacher, student)
    for prefix, vocab in (("teacher", teacher), ("student", student)):
        ids, index = (getattr(alignment, f"{prefix}_input_ids")[0],
                      getattr(alignment, f"{prefix}_chunk_index")[0])
        bos = ids == vocab.roles["bos"]
        assert bos.sum() >= 2 and (index[bos] == -1).all()


def test_long_conversation_is_truncated_not_dropped(vocabs):
    teacher, student = vocabs
    long_chat = [{"role": "user", "content": BASE_CORPUS[:2000]}, {"role": "assistant", "content": "ok"}]
    window = Packer([long_chat, CHAT], teacher, student, max_length=64, shuffle=False).next_window()
    assert sum(len(p.teacher_ids) for p in window) <= 64
    assert any(p.aligned for p in window)


# ------------------------------------------------------------------------------------------ streaming corpora
def test_corpus_streams_txt_jsonl_and_gz_in_blocks(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    text = ("para one line\n" * 30 + "\n") * 12
    (folder / "a.txt").write_text(text)
    records = [{"text": f"record {i} " * 40} for i in range(7)] + [{"messages": CHAT}]
    lines = "\n".join(json.dumps(r) for r in records)
    (folder / "b.jsonl").write_text(lines)
    with gzip.open(folder / "sub" / "c.jsonl.gz", "wt") as handle:
        handle.write(lines)
    (folder / "ignored.md").write_text("not a corpus file")
    expected = split_text(text, 500) + [r["text"] for r in records[:-1]] + [CHAT]
    expected += expected[len(split_text(text, 500)):]
    corpus = open_corpus([str(folder)], doc_bytes=500, block_docs=3)
    assert len(corpus) == len(expected) and list(corpus) == expected
    assert all(source.docs is None for source in corpus.sources)  # nothing of the files is held but blocks
    assert len(corpus._blocks) <= 4
    in_order = [corpus.document(0, 0, k, shuffle=False) for k in range(len(corpus))]
    assert in_order == expected
    for epoch in (0, 1):
        shuffled = [corpus.document(5, epoch, k) for k in range(len(corpus))]
        assert sorted(map(str, shuffled)) == sorted(map(str, expected)) and shuffled != expected
        gz_docs = [d for d in shuffled if d in expected[-8:] and isinstance(d, str)
                   and (folder / "sub").exists()]
        assert gz_docs  # the gz file's documents are there
    blocks, _ = corpus._order(5, 0, True)
    gz = corpus.sources.index(next(s for s in corpus.sources if s.compressed))
    gz_blocks = blocks[corpus.block_source[blocks] == gz]
    assert (np.diff(gz_blocks) > 0).all()  # a compressed file is read forwards within an epoch


# ----------------------------------------------------------------------------------------------- window index
def test_window_index_lets_each_rank_pack_only_its_windows(vocabs, tmp_path):
    teacher, student = vocabs
    docs = split_text(BASE_CORPUS + DONOR_CORPUS, 300)
    single = DistillLoader(Packer(docs, teacher, student, max_length=32, seed=4), micro_batch_size=2,
                           grad_accum=2)
    expected = [single.step_batches() for _ in range(3)]
    path = tmp_path / "index.json"
    index = shared_window_index(Packer(docs, teacher, student, max_length=32, seed=4), 12, path, "fp", True,
                                lambda: None)
    assert len(index) == 12 and index.state(12).windows == 12
    assert len(WindowIndex.load(path, "other")) == 0  # another recipe's index is not reused
    for rank in range(2):
        packer = Packer(docs, teacher, student, max_length=32, seed=4)
        calls: list[int] = []

        def counted(original=packer.next_window, calls=calls):
            calls.append(1)
            return original()

        packer.next_window = counted
        loader = DistillLoader(packer, micro_batch_size=2, rank=rank, world_size=2,
                               index=WindowIndex.load(path, "fp"), prefetch=rank == 1)
        for step in range(3):
            got = loader.step_batches()[0]
            for field in dataclasses.fields(got):
                assert torch.equal(getattr(got, field.name),
                                   getattr(expected[step][rank], field.name)), field.name
        assert len(calls) == 3 * 2  # its own 2 windows per step, not the global 4
        state = loader.state_dict()
        assert state["windows"] == 12 and state == dataclasses.asdict(index.state(12))
    with pytest.raises(TransplantError, match="window index covers 12 windows"):
        index.state(13)
    longer = WindowIndex.load(path, "fp").extend(Packer(docs, teacher, student, max_length=32, seed=4), 16)
    assert len(longer) == 16 and np.array_equal(longer.states[:13], index.states)


def test_a_small_mixed_corpus_is_mixed_from_the_first_documents(tmp_path):
    """Several small sources (one block each) are shuffled as one pool: a short run sees all of them. Before,
    blocks were shuffled as units and 30 healing steps read only the German source."""
    for name in ("english", "german", "code", "numbers"):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{name} document {i} " + "x" * 40
                                                          for i in range(60)))
    corpus = open_corpus([str(tmp_path / f"{n}.txt") for n in ("english", "german", "code", "numbers")],
                         doc_bytes=50, block_docs=100)
    first = [corpus.document(seed=0, epoch=0, position=i).split()[0] for i in range(24)]
    assert set(first) == {"english", "german", "code", "numbers"}, first
    whole = sorted(corpus.document(seed=0, epoch=0, position=i) for i in range(240))
    assert whole == sorted(corpus.document(seed=0, epoch=0, position=i, shuffle=False) for i in range(240))
    assert [corpus.document(seed=0, epoch=1, position=i) for i in range(24)] != \
        [corpus.document(seed=0, epoch=0, position=i) for i in range(24)]


def test_more_small_sources_than_cached_blocks_are_still_mixed(tmp_path):
    """Six small sources are six blocks, more than the block cache holds: the smoke recipe's six-source mix
    (five texts and the chat file) read one source after the other until the whole-corpus rule counted
    documents instead of blocks."""
    names = ["english", "german", "code", "numbers", "portuguese", "chat"]
    for name in names:
        docs = [f"{name} document {i} " + "x" * 40 for i in range(60)]
        (tmp_path / f"{name}.txt").write_text("\n\n".join(docs))
    corpus = open_corpus([str(tmp_path / f"{n}.txt") for n in names], doc_bytes=50, block_docs=100)
    first = [corpus.document(seed=0, epoch=0, position=i).split()[0] for i in range(36)]
    assert set(first) == set(names), first
    whole = sorted(corpus.document(seed=0, epoch=0, position=i) for i in range(360))
    assert whole == sorted(corpus.document(seed=0, epoch=0, position=i, shuffle=False) for i in range(360))


def test_stratified_order_spreads_every_source_evenly():
    """The smoke recipe's mix: 19 number-table documents among 647, 501 of them short conversations. A plain
    permutation let one seed's 120 steps (150 documents) read none of the number tables; the stratified order
    gives every prefix its share of every source within a document or two."""
    import numpy as np

    from distill.corpus import stratified_order

    counts = [18, 35, 37, 37, 19, 501]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for seed in range(5):
        order = stratified_order(counts, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(sum(counts)))
        source = np.searchsorted(starts, order, side="right") - 1
        for n in range(1, sum(counts) + 1):
            seen = np.bincount(source[:n], minlength=len(counts))
            off = np.abs(seen - n * np.array(counts) / sum(counts))
            # each source is within 1 of its share in key space; the prefix's other sources' rounding lands on
            # the big one, so: the small sources within 2 documents, the dominant one within the source count
            assert np.all(off[:5] <= 2) and off[5] <= len(counts), (seed, n, seen)
        assert not np.array_equal(order, stratified_order(counts, np.random.default_rng(seed + 100)))
    assert stratified_order([], np.random.default_rng(0)).size == 0


def test_stratify_reads_every_document_once_per_epoch(tmp_path):
    names = ["english", "numbers", "chat"]
    sizes = {"english": 20, "numbers": 6, "chat": 120}
    for name in names:
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{name} document {i} " + "x" * 40
                                                          for i in range(sizes[name])))
    corpus = open_corpus([str(tmp_path / f"{n}.txt") for n in names], doc_bytes=50, block_docs=100)
    total = sum(sizes.values())

    def epoch(seed: int, number: int, stratify: bool) -> list[str]:
        return [corpus.document(seed=seed, epoch=number, position=i, stratify=stratify) for i in range(total)]

    stratified = epoch(0, 0, True)
    assert sorted(stratified) == sorted(epoch(0, 0, False))  # the same documents, once each
    assert stratified == epoch(0, 0, True)  # a pure function of (seed, epoch): resumes read the same
    assert stratified != epoch(0, 1, True) and stratified != epoch(1, 0, True)
    assert stratified != epoch(0, 0, False)  # an option: the plain order is unchanged
    first_25 = [doc.split()[0] for doc in stratified[:25]]
    assert first_25.count("numbers") >= 1 and first_25.count("english") >= 3
