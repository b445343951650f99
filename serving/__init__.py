"""rtq: real-time inference server and benchmark suite for extremely quantized classifiers."""

__version__ = "0.1.0"
