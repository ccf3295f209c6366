"""Identity is identity: a model transplanted onto the tokenizer it already has comes out bit for bit.

The model under test has a byte-fallback SentencePiece tokenizer (so it holds byte twins such as `<0x31>`
beside `1`, the rows the join and the unreachable-row repair would otherwise touch), tied and untied.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import transplant
from tests.test_vocab import train_sentencepiece
from transplant.assets import load_vocab
from transplant.init.reachable import byte_twins


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTRANSPLANT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), "fallback")


def _tensors(folder):
    return {name: tensor for path in sorted(folder.glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("base_key", ["base_tied", "base_untied"])
def test_a_model_on_its_own_tokenizer_is_copied_bit_exactly(tiny_pair, sp_path, tmp_path, base_key):
    model = tmp_path / "model"
    transplant.transplant(tiny_pair[base_key], sp_path, method="fvt", output=model)
    result = transplant.transplant(model, model, output=tmp_path / "again")  # donor model: default fvt-ls
    assert len(byte_twins(load_vocab(model))) > 20  # rows the join would send elsewhere
    stats = result.stats
    assert (stats["new"], stats["dropped"], stats["unreachable_rows"], stats["near_duplicates_repaired"]) == (
        0, 0, 0, 0)
    assert stats["shared"] == stats["new_vocab_size"] == stats["base_vocab_size"]
    before, after = _tensors(model), _tensors(tmp_path / "again")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
