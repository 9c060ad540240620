"""llmdistill: turn a large language model into a smaller one that keeps most of its ability."""

__version__ = "0.1.0"
