"""Evaluation layer: bits per byte (`bpb`), whether a chat model is still one (`chat`: answer-only bits per
byte in the model's own chat template, agreement with a teacher's answers), the stock lm-eval bridge and its
local tasks (`lmeval`, `lm_eval_tasks`, the stock command that reproduces each number: `lmeval_stock`),
and the transplant report (`report`), with its plot (`plots`) and the
output's model card (`card`)."""
