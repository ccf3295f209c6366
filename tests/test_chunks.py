"""Chunk alignment between two tokenizations: hand-made byte vocabularies, then real tokenizer pairs
(slow)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from distill.chunks import align_batch, boundary_mask, tokenize_pair, word_start_mask
from transplant.tokenizers.vocab import TokenKind, Vocab


class GreedyTokenizer:
    """Greedy longest-match over bytes: enough of a tokenizer for `Vocab.encode` in tests."""

    def __init__(self, pieces: list[bytes], kinds: list[TokenKind], prefix: bool):
        self.ids = {p: i for i, (p, k) in enumerate(zip(pieces, kinds)) if p and k is not TokenKind.SPECIAL}
        self.longest = max(map(len, self.ids))
        self.prefix = prefix

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        data = (b" " if self.prefix else b"") + text.encode()
        out, at = [], 0
        while at < len(data):
            for size in range(min(self.longest, len(data) - at), 0, -1):
                if data[at:at + size] in self.ids:
                    out.append(self.ids[data[at:at + size]])
                    at += size
                    break
            else:
                raise ValueError(f"no token for {data[at:at + 1]!r}")
        return out


def make_vocab(pieces: list[bytes], specials: tuple[str, ...] = ("bos", "eos"),
               prefix: bool = False) -> Vocab:
    """Normal tokens `pieces`, single non-ASCII bytes as byte-fallback tokens, then one special per role."""
    pieces = list(pieces)
    kinds = [TokenKind.BYTE if len(p) == 1 and p[0] >= 0x80 else TokenKind.NORMAL for p in pieces]
    roles = {}
    for role in specials:
        roles[role] = len(pieces)
        pieces.append(b"")
        kinds.append(TokenKind.SPECIAL)
    return Vocab(tokenizer=GreedyTokenizer(pieces, kinds, prefix), token_bytes=pieces, kinds=kinds,
                 roles=roles, name="tiny", adds_prefix_space=prefix)


def ids_of(vocab: Vocab, *tokens) -> list[int]:
    """Ids for bytes tokens, or role names (str) for specials."""
    lookup = {p: i for i, p in enumerate(vocab.token_bytes) if p}
    return [vocab.roles[t] if isinstance(t, str) else lookup[t] for t in tokens]


def chunk_texts(alignment, row: int, text: bytes) -> list[bytes]:
    mask = alignment.chunk_mask[row]
    return [text[s:e] for s, e in zip(alignment.chunk_byte_start[row][mask].tolist(),
                                      alignment.chunk_byte_end[row][mask].tolist())]


def test_basic_chunks_token_index_and_positions():
    teacher = make_vocab([b"Hello", b" world", b"!"])
    student = make_vocab([b"Hell", b"o", b" w", b"orld", b"!"])
    t = ids_of(teacher, "bos", b"Hello", b" world", b"!")
    s = ids_of(student, "bos", b"Hell", b"o", b" w", b"orld", b"!")
    a = align_batch([t], [s], teacher, student)
    assert a.chunk_mask.tolist() == [[True] * 3]  # bos is in no chunk (never paired)
    assert a.chunk_is_special.tolist() == [[False, False, False]]
    assert chunk_texts(a, 0, b"Hello world!") == [b"Hello", b" world", b"!"]
    assert a.teacher_chunk_index.tolist() == [[-1, 0, 1, 2]]
    assert a.student_chunk_index.tolist() == [[-1, 0, 0, 1, 1, 2]]
    assert a.student_chunk_first.tolist() == [[1, 3, 5]]
    assert a.student_chunk_last.tolist() == [[2, 4, 5]]
    assert a.teacher_chunk_last.tolist() == [[1, 2, 3]]
    assert a.chunk_followed_by_whitespace.tolist() == [[True, False, False]]
    dense = a.student_token_to_chunk
    assert dense.shape == (1, 6, 3) and dense.dtype == torch.bool
    assert torch.equal(dense.long().argmax(-1), a.student_chunk_index[0].clamp(min=0).unsqueeze(0))
    assert dense.sum().item() == 5


def test_sentencepiece_dummy_prefix_is_removed():
    teacher = make_vocab([b"Hello", b" world"])
    student = make_vocab([b" Hello", b" wor", b"ld"], prefix=True)
    t = teacher.encode("Hello world")
    s = student.encode("Hello world")
    assert [student.token_bytes[i] for i in s] == [b" Hello", b" wor", b"ld"]
    a = align_batch([t], [s], teacher, student)
    assert chunk_texts(a, 0, b"Hello world") == [b"Hello", b" world"]
    assert a.student_chunk_index.tolist() == [[0, 1, 1]]


def test_specials_pair_by_role_and_unpaired_are_masked():
    teacher = make_vocab([b"ab", b"c"], specials=("bos", "eos"))
    student = make_vocab([b"a", b"b", b"c"], specials=("eos", "bos", "pad"))
    t = ids_of(teacher, "bos", b"ab", b"c", "eos")
    s = ids_of(student, b"a", b"b", b"c", "eos", "pad")  # no bos; a stray pad special
    a = align_batch([t], [s], teacher, student)
    assert chunk_texts(a, 0, b"abc") == [b"ab", b"c", b""]
    assert a.chunk_is_special.tolist() == [[False, False, True]]
    assert a.teacher_chunk_index.tolist() == [[-1, 0, 1, 2]]  # teacher bos has no partner
    assert a.student_chunk_index.tolist() == [[0, 0, 1, 2, -1]]  # student pad has no partner


def test_special_with_several_roles_pairs_by_any_role():
    # GPT-2 style: one <|endoftext|> id is bos, eos and unk at once
    teacher = make_vocab([b"ab", b"c"], specials=("bos",))
    teacher.roles.update({"eos": teacher.roles["bos"], "unk": teacher.roles["bos"]})
    student = make_vocab([b"a", b"b", b"c"], specials=("bos", "eos"))
    t = ids_of(teacher, "bos", b"ab", b"c", "bos")
    s = ids_of(student, "bos", b"a", b"b", b"c", "eos")
    a = align_batch([t], [s], teacher, student)
    # the leading one is read as bos (unpaired); the trailing one pairs with eos through its eos role
    assert a.chunk_is_special.tolist() == [[False, False, True]]
    assert a.teacher_chunk_index.tolist() == [[-1, 0, 1, 2]]
    assert a.student_chunk_index.tolist() == [[-1, 0, 0, 1, 2]]


def test_byte_fallback_shares_no_boundary_inside_a_character():
    e_acute = "é".encode()  # c3 a9
    teacher = make_vocab([b"caf", e_acute, b" ok"])
    student = make_vocab([b"ca", b"f", e_acute[:1], e_acute[1:], b" ok"])
    assert student.kinds[2] is TokenKind.BYTE
    text = "café ok".encode()
    t = teacher.encode("café ok")
    s = student.encode("café ok")
    assert [student.token_bytes[i] for i in s] == [b"ca", b"f", b"\xc3", b"\xa9", b" ok"]
    a = align_batch([t], [s], teacher, student)
    assert chunk_texts(a, 0, text) == [b"caf", e_acute, b" ok"]
    assert a.student_chunk_index.tolist() == [[0, 0, 1, 1, 2]]


def test_truncation_keeps_only_chunks_complete_on_both_sides():
    teacher = make_vocab([b"one", b" two", b" three"])
    student = make_vocab([b"on", b"e", b" t", b"wo", b" th", b"ree"])
    t = ids_of(teacher, b"one", b" two", b" three")
    s = ids_of(student, b"on", b"e", b" t", b"wo", b" th")  # truncated inside " three"
    a = align_batch([t], [s], teacher, student)
    assert chunk_texts(a, 0, b"one two three") == [b"one", b" two"]
    assert a.teacher_chunk_index.tolist() == [[0, 1, -1]]
    assert a.student_chunk_index.tolist() == [[0, 0, 1, 1, -1]]


def test_batch_padding_and_max_chunks():
    teacher = make_vocab([b"a", b"b", b"c", b"d"], specials=("bos", "eos", "pad"))
    student = make_vocab([b"ab", b"cd", b"c", b"d"])
    a = align_batch([teacher.encode("abcd"), teacher.encode("ab")],
                    [student.encode("abcd"), student.encode("ab")], teacher, student)
    assert a.teacher_input_ids.shape == (2, 4) and a.student_input_ids.shape == (2, 2)
    assert a.teacher_input_ids[1, 2:].tolist() == [teacher.roles["pad"]] * 2
    assert a.teacher_attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert a.student_attention_mask.tolist() == [[1, 1], [1, 0]]
    assert a.chunk_mask.tolist() == [[True, True], [True, False]]
    assert a.teacher_chunk_index.tolist() == [[0, 0, 1, 1], [0, 0, -1, -1]]
    fixed = align_batch([teacher.encode("abcd")], [student.encode("abcd")], teacher, student, max_chunks=1)
    assert fixed.chunk_mask.shape == (1, 1)
    assert fixed.teacher_chunk_index.tolist() == [[0, 0, -1, -1]]
    wide = align_batch([teacher.encode("abcd")], [student.encode("abcd")], teacher, student, max_chunks=5)
    assert wide.chunk_mask.tolist() == [[True, True, False, False, False]]


def test_whitespace_runs_and_emoji():
    emoji = "🙂".encode()  # 4 bytes
    teacher = make_vocab([b"x", b"   ", b" y", emoji, b"\n\n"])
    student = make_vocab([b"x", b" ", b" y", emoji[:2], emoji[2:], b"\n"])
    text = "x    y🙂\n\n"
    a = align_batch([teacher.encode(text)], [student.encode(text)], teacher, student)
    # teacher "   " + " y" vs student " " x 3 + " y": the run splits where both split it
    assert chunk_texts(a, 0, text.encode()) == [b"x", b"   ", b" y", emoji, b"\n\n"]
    assert a.chunk_followed_by_whitespace.tolist() == [[True, True, False, True, False]]


def test_check_bytes_stops_at_the_first_difference():
    teacher = make_vocab([b"ab", b"cd", b"ef"])
    student = make_vocab([b"ab", b"cX", b"ef", b"cd"])
    t = ids_of(teacher, b"ab", b"cd", b"ef")
    s = ids_of(student, b"ab", b"cX", b"ef")  # same lengths, different bytes from offset 3
    assert chunk_texts(align_batch([t], [s], teacher, student), 0, b"abcdef") == [b"ab"]
    unchecked = align_batch([t], [s], teacher, student, check_bytes=False)
    assert unchecked.chunk_mask.sum().item() == 3


def test_random_segmentations_give_exact_chunks():
    """Invariant check: each chunk's bytes equal its tokens' bytes on both sides and chunks tile the text."""
    rng = random.Random(0)
    alphabet = "ab é🙂\n"
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))).encode()

        def split(data: bytes) -> list[bytes]:
            cuts = (sorted(rng.sample(range(1, len(data)), k=rng.randint(0, len(data) - 1))) if len(data)
                    > 1 else [])
            return [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]

        t_pieces, s_pieces = split(text), split(text)
        teacher = make_vocab(sorted(set(t_pieces)))
        student = make_vocab(sorted(set(s_pieces)))
        t = [teacher.bytes_to_id[p] for p in t_pieces]
        s = [student.bytes_to_id[p] for p in s_pieces]
        a = align_batch([t], [s], teacher, student)
        spans = list(zip(a.chunk_byte_start[0].tolist(), a.chunk_byte_end[0].tolist()))
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(prev[1] == cur[0] for prev, cur in zip(spans, spans[1:]))
        t_ends, s_ends = np.cumsum([len(p) for p in t_pieces]), np.cumsum([len(p) for p in s_pieces])
        assert [e for _, e in spans] == sorted(set(t_ends) & set(s_ends))
        for vocab, ids, index in ((teacher, t, a.teacher_chunk_index[0]),
                                  (student, s, a.student_chunk_index[0])):
            for chunk, (start, end) in enumerate(spans):
                members = [vocab.token_bytes[i] for i, c in zip(ids, index.tolist()) if c == chunk]
                assert b"".join(members) == text[start:end]


def test_tokenize_pair_truncates_to_a_common_boundary():
    teacher = make_vocab([b"one", b" two", b" three", b" t"])
    student = make_vocab([b" on", b"on", b"e", b" t", b"wo", b" th", b"ree"], prefix=True)
    pair = tokenize_pair("one two three", teacher, student, max_length=(3, 4))
    # length cuts leave teacher [bos, one, " two"] (ends 3, 7) and student [bos, " on", e, " t"] (ends 2, 3,
    # 5): the last shared end is 3
    assert [teacher.token_bytes[i] for i in pair.teacher_ids] == [b"", b"one"]
    assert [student.token_bytes[i] for i in pair.student_ids] == [b"", b" on", b"e"]
    assert pair.num_bytes == 3
    whole = tokenize_pair("one two three", teacher, student, max_length=64, add_eos=True)
    assert whole.num_bytes == 13
    assert whole.teacher_ids[-1] == teacher.roles["eos"] and whole.student_ids[-1] == student.roles["eos"]
    a = align_batch([whole.teacher_ids], [whole.student_ids], teacher, student)
    assert chunk_texts(a, 0, b"one two three") == [b"one", b" two", b" three", b""]  # eos pairs, bos does not


def test_word_start_mask():
    vocab = make_vocab([b" a", b"a", b"\nb", b"\xc3", b"\t"])
    assert word_start_mask(vocab).tolist() == [True, False, True, False, True, False, False]


def test_boundary_mask_is_space_tab_newline_or_special():
    vocab = make_vocab([b" a", b"a", b"\nb", b"\xc3", b"\t", b"\rx", b"\x0c"])
    # the reference's "space+tab+newline+special": \r and form feed are not unit ends, bos and eos are
    assert boundary_mask(vocab).tolist() == [True, False, True, False, True, False, False, True, True]


def test_phantom_flag_overrides_the_dummy_prefix_rule():
    teacher = make_vocab([b"Hi", b" there"])
    student = make_vocab([b" Hi", b" there", b"Hi"], prefix=True)
    t, s = ids_of(teacher, b"Hi", b" there"), ids_of(student, b" Hi", b" there")
    # " Hi there" cut out of a longer text: the student's first space is real, the teacher's side starts with
    # it
    real = align_batch([ids_of(teacher, b" there")], [ids_of(student, b" there")], teacher, student,
                       phantom=[(None, False)])
    assert chunk_texts(real, 0, b" there") == [b" there"]
    guessed = align_batch([ids_of(teacher, b" there")], [ids_of(student, b" there")], teacher, student)
    # the dummy-prefix rule strips the real space: no shared bytes
    assert guessed.chunk_mask.sum().item() == 0
    assert chunk_texts(align_batch([t], [s], teacher, student, phantom=[(False, True)]), 0, b"Hi there") == \
        [b"Hi", b" there"]


# -------------------------------------------------------------------------------------------- real tokenizers

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n\n    def f(x):\n\t\treturn x  *  2   \n",
    "Über straße café naïve résumé — «quotes» and 'apostrophes'.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Русский текст и ελληνικά. Emoji: 🙂👍🏽🧑‍💻🇩🇪 and rare CJK 𠜎𠜱.",
    "   leading spaces, trailing tabs\t\t\nnumbers 1234567890 3.14159 2026-11-24",
]
PAIRS = [("llama3", "mistral-v3"), ("mistral-v3", "gpt2"), ("llama3", "qwen"),
         ("smollm2-135m", "gemma3-270m"), ("gemma3-270m", "mistral-v1")]


def _load(name):
    from transplant.assets import load_vocab

    return load_vocab(name)


@pytest.mark.slow
@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_real_tokenizer_pairs_chunk_bytes_match(teacher_name, student_name):
    teacher, student = _load(teacher_name), _load(student_name)
    byte_tokens = 0
    for text in SAMPLE_TEXTS:
        pair = tokenize_pair(text, teacher, student, max_length=4096)
        data = text.encode()
        assert pair.num_bytes == len(data), (teacher_name, student_name, text)
        a = align_batch([pair.teacher_ids], [pair.student_ids], teacher, student)
        spans = [(s, e) for s, e in zip(a.chunk_byte_start[0].tolist(), a.chunk_byte_end[0].tolist())]
        spans = [sp for sp, m, sp_special in zip(spans, a.chunk_mask[0].tolist(),
                                                 a.chunk_is_special[0].tolist())
                 if m and not sp_special]
        assert spans[0][0] == 0 and spans[-1][1] == len(data)
        assert all(prev[1] == cur[0] for prev, cur in zip(spans, spans[1:]))
        for vocab, ids, index in ((teacher, pair.teacher_ids, a.teacher_chunk_index[0]),
                                  (student, pair.student_ids, a.student_chunk_index[0])):
            pieces = [b""] * a.num_chunks
            for token, chunk in zip(ids, index.tolist()):
                if chunk >= 0:
                    pieces[chunk] += vocab.token_bytes[token]
            got = [p for p, special in zip(pieces, a.chunk_is_special[0].tolist()) if not special]
            if vocab.adds_prefix_space:
                got[0] = got[0][1:]  # the dummy prefix is not text
            assert got == [data[s:e] for s, e in spans], (vocab.name, text)
        byte_tokens += sum(student.kinds[i] is TokenKind.BYTE for i in pair.student_ids)
        byte_tokens += sum(teacher.kinds[i] is TokenKind.BYTE for i in pair.teacher_ids)
        # bos never pairs: the first token of both sides is in no chunk when both have one
        if "bos" in teacher.roles and "bos" in student.roles:
            assert a.teacher_chunk_index[0, 0] == -1 == a.student_chunk_index[0, 0]
    if any(TokenKind.BYTE in v.kinds for v in (teacher, student)):
        assert byte_tokens > 0  # the texts exercise byte fallback (rare CJK, emoji) where a side has it


@pytest.mark.slow
def test_real_truncation_covers_same_bytes():
    teacher, student = _load("llama3"), _load("mistral-v3")
    text = " ".join(SAMPLE_TEXTS) * 3
    pair = tokenize_pair(text, teacher, student, max_length=64)
    assert len(pair.teacher_ids) <= 64 and len(pair.student_ids) <= 64
    t_bytes = b"".join(teacher.token_bytes[i] for i in pair.teacher_ids)
    s_bytes = b"".join(student.token_bytes[i] for i in pair.student_ids)[1:]  # dummy prefix
    assert t_bytes == s_bytes == text.encode()[:pair.num_bytes]
