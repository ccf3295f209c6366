"""tokentransplant: give a pretrained language model a new tokenizer, byte-exact, then heal it.

Public API: `transplant.transplant(base, donor, ...)`, `transplant.extend_vocab(...)` and
`transplant.eval.bpb.bits_per_byte(...)`. Imported lazily so `import transplant.tokenizers.vocab` stays light.

Layers, bottom up (docs/architecture.md): `errors`, `cache`, `dtypes`, `version`, `recipes` (typed YAML and
`--set`) and `options` (typed registry options, entry-point discovery) import nothing of the project but each
other; then `solvers`, `tokenizers`, `assets`, `io`, `init`, `eval`; on top
`pipeline` (`transplant()`) and `extend` (`extend_vocab()`). The command lines are `cli.py`'s.
"""

from transplant.version import __version__

__all__ = ["transplant", "extend_vocab", "TransplantResult", "__version__"]


def __getattr__(name: str):
    if name in ("transplant", "TransplantResult"):
        from transplant import pipeline

        return getattr(pipeline, name)
    if name == "extend_vocab":
        from transplant.extend import extend_vocab

        return extend_vocab
    raise AttributeError(name)
