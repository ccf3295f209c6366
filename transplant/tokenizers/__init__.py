"""Tokenizer layer: every tokenizer family as a `Vocab` of exact byte strings, kinds and roles.

Reads only the files it is given (aliases are resolved one layer up, in `transplant.assets`). Modules:
`vocab` (the `Vocab` contract), `formats` (SentencePiece / tiktoken / tekken converters), `load` (files and
dirs, sniffed by content), `gguf_header` (a GGUF header bounds-checked before any reader trusts it), `family`
(the `tokenizer_class` a saved config names), `align` (shared tokens by bytes, specials by role), `control`
(chat and control tokens kept across a swap, `--map-token`), `bos` (a BOS added exactly when the base
added one), `segment` (a token's bytes in another
vocabulary's pieces), `files` (the file names a tokenizer is saved as), `token_class` (a coarse
class per token from its bytes: space-word, digits, CJK, ...).
"""
