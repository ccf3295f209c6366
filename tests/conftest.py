"""Shared fixtures: tiny real tokenizers and tiny Llama models built inside the tests (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The catalog of cats and dogs is long. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "Numbers: 12345 67890 3.14159 2026-11-24. Tokens are byte strings; alignment is exact. "
) * 20
DONOR_CORPUS = (
    "A catalogue of catalogs: the cat sat on the mat. Über straße café naïve résumé. "
    "for i in range(10):\n\tprint(i * i)\n"
    "Emoji 🙂👍🏽 and 日本語のテキスト and русский текст. 1 22 333 4444 55555. "
) * 20


def build_byte_bpe(directory: Path, corpus: str, vocab_size: int, specials: list[str]) -> Path:
    """Train a GPT-2-style byte-level BPE on `corpus` and save it as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[-1])
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    config = directory / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.write_text(json.dumps(data, indent=2))
    return directory


def build_tiny_llama(directory: Path, tokenizer_dir: Path, *, tied: bool, hidden: int = 32,
                     seed: int = 0) -> Path:
    """A 2-layer Llama sized to the tokenizer, saved with safetensors next to its tokenizer files."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, directory / item.name)
    return directory


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(base model dir tied, base model dir untied, donor tokenizer dir, donor model dir)."""
    root = tmp_path_factory.mktemp("tiny")
    base_tok = build_byte_bpe(root / "base_tok", BASE_CORPUS, 400, ["<s>", "</s>", "<pad>"])
    donor_tok = build_byte_bpe(root / "donor_tok", DONOR_CORPUS + BASE_CORPUS[:300], 450,
                               ["<s>", "</s>", "<pad>"])
    return {
        "base_tied": build_tiny_llama(root / "base_tied", base_tok, tied=True),
        "base_untied": build_tiny_llama(root / "base_untied", base_tok, tied=False, seed=1),
        "base_tok": base_tok,
        "donor_tok": donor_tok,
        "donor_model": build_tiny_llama(root / "donor_model", donor_tok, tied=False, hidden=48, seed=2),
    }


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
          "'<|im_start|>assistant\n' }}{% endif %}")


def build_chatml_model(root: Path, *, seed: int) -> Path:
    """A tiny instruct-style model: ChatML markers as specials, a ChatML template, byte-level BPE (every text
    round-trips)."""
    import json

    tok = build_byte_bpe(root / "tok", BASE_CORPUS, 400, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"])
    config_path = tok / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(chat_template=CHATML, bos_token="<|im_start|>", eos_token="<|im_end|>",
                  pad_token="<|im_end|>")
    config_path.write_text(json.dumps(config))
    return build_tiny_llama(root / "model", tok, tied=True, seed=seed)
