"""lopa: an inference engine for diffusion language models with Lookahead Parallel Decoding."""
__version__ = "0.1.0"
