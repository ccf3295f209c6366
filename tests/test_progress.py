"""Issue 13, item 7: progress bars for shard writing and for bits-per-byte scoring (what they count, not how
they look: tqdm is replaced by a recorder)."""

from __future__ import annotations

import pytest
import torch

from transplant.eval import bpb
from transplant.io import safetensors


class Recorder:
    """A stand-in for tqdm that keeps every bar's total, updates and `disable` argument."""

    bars: list[Recorder] = []

    def __init__(self, iterable=None, total=None, disable=False, **kwargs):
        self.iterable, self.total, self.disable, self.updates = iterable, total, disable, []
        Recorder.bars.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


@pytest.fixture
def recorder(monkeypatch):
    Recorder.bars = []
    monkeypatch.setattr(safetensors, "tqdm", Recorder)
    monkeypatch.setattr(bpb, "tqdm", Recorder)
    return Recorder


def _planned(count: int, rows: int = 64) -> list[safetensors.PlannedTensor]:
    return [safetensors.plan_tensor(f"t{i}", lambda i=i: torch.full((rows, 8), float(i)),
                                    torch.float32, (rows, 8))
            for i in range(count)]


def test_shard_writing_counts_every_byte_and_is_shown_only_for_large_outputs(recorder, tmp_path, monkeypatch):
    shards = safetensors.split_into_shards(_planned(5), 3 * 64 * 8 * 4)
    safetensors.write_shards(tmp_path, shards, {"format": "pt"})
    bar = recorder.bars[-1]
    total = sum(t.nbytes for shard in shards for t in shard)
    assert bar.total == total and sum(bar.updates) == total and bar.disable is True  # small: no bar
    monkeypatch.setattr(safetensors, "PROGRESS_MIN_BYTES", 1)
    (tmp_path / "big").mkdir()
    safetensors.write_shards(tmp_path / "big", shards, {"format": "pt"})
    # None: on a terminal
    assert recorder.bars[-1].disable is None and sum(recorder.bars[-1].updates) == total


def test_bits_per_byte_bar_follows_the_scored_windows(recorder, tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["base_tied"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["base_tied"])
    text = "The quick brown fox jumps over the lazy dog. " * 20
    windows = -(-len(tokenizer.encode(text, add_special_tokens=False)) // 15)
    quiet = bpb.measure_bits_per_byte(model, tokenizer, text, max_length=16, batch_size=2)
    assert all(bar.disable is True for bar in recorder.bars)
    recorder.bars = []
    shown = bpb.measure_bits_per_byte(model, tokenizer, text, max_length=16, batch_size=2, progress=True)
    inner = [bar for bar in recorder.bars if bar.total is not None]
    assert shown.bpb == quiet.bpb and inner[0].total == windows and sum(inner[0].updates) == windows
    assert all(bar.disable is None for bar in recorder.bars)
