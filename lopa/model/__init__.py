"""The model: families (Dream, LLaDA) on one shared transformer: config, layers, pure forward, checkpoint loading."""
