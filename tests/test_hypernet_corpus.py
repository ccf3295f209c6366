"""Real corpora for the hypernetwork: files and folders of .txt/.jsonl(.gz) streamed in blocks, a resumable
position, tokenizers sampled from each block's own substring counts, and memory that does not grow with the
corpus (slow test: a generated ~230 MB corpus on disk)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hypernet.data import CorpusStream, corpus_sources, cut_windows, mix_seed
from hypernet.sample import TokenizerSampler, substring_counts
from tests.conftest import BASE_CORPUS, DONOR_CORPUS
from transplant.errors import TransplantError

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def make_folder(root: Path) -> dict[str, str]:
    """One file of each kind; returns {file name: the text it holds}."""
    root.mkdir(parents=True, exist_ok=True)
    texts = {"a.txt": "alpha line one\nalpha line two ünïcödé\n" * 50,
             "b.jsonl": "".join(json.dumps({"text": f"bravo record {i}"}) + "\n" for i in range(40)),
             "c.txt.gz": "charlie gz text\n" * 60,
             "d.jsonl.gz": "".join(json.dumps({"messages": [{"role": "user", "content": f"delta {i}"}]})
                                   + "\n"
                                   for i in range(30))}
    for name, text in texts.items():
        if name.endswith(".gz"):
            with gzip.open(root / name, "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            (root / name).write_text(text, encoding="utf-8")
    (root / "ignored.csv").write_text("not,a,corpus\n")
    return texts


def test_sources_from_files_folders_and_builtin_text(tmp_path):
    make_folder(tmp_path / "c")
    names = [Path(s.name).name for s in corpus_sources(str(tmp_path / "c"))]
    assert names == ["a.txt", "b.jsonl", "c.txt.gz", "d.jsonl.gz"]
    assert [s.jsonl for s in corpus_sources(str(tmp_path / "c"))] == [False, True, False, True]
    assert len(corpus_sources(str(tmp_path / "c" / "a.txt"))) == 1
    with pytest.raises(TransplantError, match="does not exist"):
        corpus_sources(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransplantError, match="holds no"):
        corpus_sources(str(tmp_path / "empty"))


def test_stream_reads_every_file_mixes_them_and_resumes_exactly(tmp_path):
    make_folder(tmp_path / "c")
    stream = CorpusStream(corpus_sources(str(tmp_path / "c")), seed=3, chunk_bytes=256)
    blocks = [stream.read_block(i, 2000) for i in range(12)]
    seen = "".join(piece for block in blocks for piece in block)
    for marker in ("alpha line two ünïcödé", "bravo record 39", "charlie gz text", "delta 29"):
        assert marker in seen
    assert any(sum(m in "".join(block) for m in ("alpha", "bravo", "charlie", "delta")) >= 2
               for block in blocks)
    assert max(stream.passes) >= 1  # small files start over
    # a fresh stream put at the saved position reads the same block
    state = stream.state_dict()
    expected = stream.read_block(12, 2000)
    again = CorpusStream(corpus_sources(str(tmp_path / "c")), seed=3, chunk_bytes=256)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.read_block(12, 2000) == expected
    assert stream.read_block(13, 2000) == again.read_block(13, 2000)


def test_a_long_line_is_cut_on_character_boundaries(tmp_path):
    text = "ünïcödé 日本語 " * 5000  # one 130 KB line of multi-byte characters
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    stream = CorpusStream(corpus_sources(str(tmp_path / "one.txt")), chunk_bytes=1000)
    pieces = []
    while stream.passes[0] == 0:
        pieces.append(stream._read_piece(0))
    assert "".join(pieces).startswith(text) and max(len(p.encode()) for p in pieces) <= 1003


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(TransplantError, match="bad.jsonl .* neither a `text` string"):
        CorpusStream(corpus_sources(str(tmp_path / "bad.jsonl"))).read_block(0, 10_000)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe" * 100 + b"\n")
    with pytest.raises(TransplantError, match="not UTF-8"):
        CorpusStream(corpus_sources(str(tmp_path / "bin.txt"))).read_block(0, 10_000)
    (tmp_path / "void.txt").write_text("")
    with pytest.raises(TransplantError, match="has no text"):
        CorpusStream(corpus_sources(str(tmp_path / "void.txt"))).read_block(0, 100)


def test_batch_tokenizers_come_from_their_own_block():
    """ZeTT-style: a tokenizer drawn from a block's counts holds that block's substrings, not another's."""
    english, other = BASE_CORPUS, DONOR_CORPUS
    tok = TokenizerSampler(english, size_range=(2000, 2000), seed=0).sample()
    learned = [b for b in tok.token_bytes[257:]]
    assert learned and all(b.decode("utf-8", "ignore") in english for b in learned if len(b) > 3)
    other_only = set(substring_counts(other)) - set(substring_counts(english))
    assert not other_only & set(learned)
    windows = cut_windows(["x" * 50, "y" * 5000], 20, 10, __import__("random").Random(0))
    assert all(len(set(w)) == 1 for w in windows) and sum(w[0] == "y" for w in windows) > 10
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 3, 2)


def _write_corpus(root: Path, copies: int, giant_line_mb: int) -> int:
    """A folder of .txt, .jsonl, .txt.gz and one giant single-line file; returns its size on disk."""
    root.mkdir(parents=True)
    unit = (BASE_CORPUS + DONOR_CORPUS).encode("utf-8")
    with (root / "plain.txt").open("wb") as handle:
        for _ in range(copies):
            handle.write(unit)
    with (root / "records.jsonl").open("w") as handle:
        record = json.dumps({"text": (BASE_CORPUS + DONOR_CORPUS)[:2000]}) + "\n"
        handle.write(record * copies)
    with gzip.open(root / "zipped.txt.gz", "wb", compresslevel=1) as handle:
        for _ in range(copies):
            handle.write(unit)
    with (root / "oneline.txt").open("wb") as handle:
        line = unit.replace(b"\n", b" ")
        for _ in range(giant_line_mb * 2**20 // len(line)):
            handle.write(line)
    return sum(p.stat().st_size for p in root.iterdir())


def _peak_rss(tiny_pair, tmp_path: Path, name: str, corpus: Path) -> float:
    recipe = {"base": str(tiny_pair["base_untied"]), "output_dir": str(tmp_path / name),
              "corpus": str(corpus), "steps": 16, "resample_every": 1, "block_bytes": 300_000,
              "batch_size": 2, "seq_len": 24, "vocab_size": [1000, 2000], "negatives": 32, "aux_tokens": 32,
              "save_every": 100, "log_every": 1, "model": {"d_model": 16, "layers": 1, "heads": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "cli", "hypernet", "train", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / name / "history.json").read_text())
    assert history[-1]["step"] == 16
    return max(h["peak_rss_mb"] for h in history)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tiny_pair, tmp_path):
    """~2 MB and ~230 MB on disk (text, jsonl, gzip, a 120 MB single line): the same training run's peak RSS
    may differ by noise, not by the corpus (the old reader held the whole corpus and its substring
    Counter)."""
    small_size = _write_corpus(tmp_path / "small", copies=100, giant_line_mb=1)
    large_size = _write_corpus(tmp_path / "large", copies=10000, giant_line_mb=120)
    try:
        assert large_size > 50 * small_size and 200 * 2**20 < large_size < 300 * 2**20
        small = _peak_rss(tiny_pair, tmp_path, "small_run", tmp_path / "small")
        large = _peak_rss(tiny_pair, tmp_path, "large_run", tmp_path / "large")
    finally:
        for folder in ("small", "large"):
            for item in (tmp_path / folder).iterdir():
                item.unlink()
    print(f"peak RSS: {small} MB on {small_size / 2**20:.1f} MB of corpus, {large} MB on "
          f"{large_size / 2**20:.0f} MB")
    assert large - small < 40, (small, large)  # MB; the large corpus alone is ~230 MB
