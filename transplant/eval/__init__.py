"""Evaluation layer: bits per byte (`bpb`), the stock lm-eval bridge and its local tasks (`lmeval`), and the
transplant report (`report`)."""
