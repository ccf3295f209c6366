"""A ZeTT-style hypernetwork that predicts embedding rows for any new tokenizer of a frozen base model.

`model` (the network), `sample` (diverse training tokenizers), `data` (streamed text), `lm` (the frozen base
LM on predicted rows), `losses`, `config` (the recipe), `train` (its loop, on `distill`'s runtime, model
loading and checkpoints), `initializer` (the `hypernet` transplant method, an entry-point plug-in). The
command line is `cli.py`'s.
"""
