"""effitrain: config-driven training of transformer models with PyTorch."""

__version__ = "0.1.0"
