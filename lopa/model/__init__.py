"""The model: one shared transformer (pure forward, layers, K/V access and cache, fused / pooled / tensor-parallel
forms) and the families that run on it (families/: Dream, LLaDA, SDAR). Checkpoint files are lopa.checkpoint's."""
