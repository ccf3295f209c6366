"""The file names a tokenizer is saved as, in one place (surgery copies them, `Vocab.save` replaces them)."""

from __future__ import annotations

# What `Vocab.save` writes: the fast tokenizer and its config, loadable by transformers 4.x and 5.x.
WRITTEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Other tokenizer files a model dir may hold. `Vocab.save` removes them (they would disagree with the new
# tokenizer.json); exports copy them through with the written ones. Glob patterns.
OTHER_FILES = (
    "tokenizer.model",
    "tokenizer.model.v*",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tekken.json",
    "tokenizer.tiktoken",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

TOKENIZER_FILES = WRITTEN_FILES + OTHER_FILES
