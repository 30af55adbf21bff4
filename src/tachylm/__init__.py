"""tachylm: a small, fast, PyTorch-native engine for running large language models."""

__version__ = "0.1.0"
