"""The Dream-architecture model: config, layers, pure forward, checkpoint loading."""
