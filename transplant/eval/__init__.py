"""Evaluation layer: bits per byte (`bpb`), the stock lm-eval bridge and its local tasks (`lmeval`,
`lm_eval_tasks`), and the transplant report (`report`), with its plot (`plots`) and the output's model card
(`card`)."""
