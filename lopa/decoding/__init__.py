"""Decoding strategies: pure tensor logic over GenState and predictions (never the model, cache or parallel)."""
