"""Tokenizer layer: every tokenizer family as a `Vocab` of exact byte strings, kinds and roles.

Reads only the files it is given (aliases are resolved one layer up, in `transplant.assets`). Modules:
`vocab` (the `Vocab` contract), `formats` (SentencePiece / tiktoken / tekken converters), `load` (files and
dirs, sniffed by content), `align` (shared tokens by bytes, specials by role), `segment` (a token's bytes in
another vocabulary's pieces), `files` (the file names a tokenizer is saved as).
"""
