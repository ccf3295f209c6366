"""Cross-tokenizer distillation: heal a transplanted student from a teacher (docs/design.md §5).

Data path: `corpus` (lazy corpora) → `data` (packed windows tokenized by both tokenizers, `chat` for
conversations) → `chunks` (byte-chunk alignment) → `losses` (the loss registry). Training: `config` (the
recipe), `runtime` (processes, device, DeepSpeed config), `teacher` (frozen, replicated or sharded), `student`
(made, loaded and checked), `optim`, `lora`, `trainer` (`run(recipe)`), `checkpoint` (exact resume),
`export` (a plain HF dir). Measuring a run: `agreement` (teacher agreement on held-out text), `scores` (how
much of the gap to the teacher was closed).
The command line is `cli_train.py`'s.
"""
