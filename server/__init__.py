"""ctc-serve: an OpenAI-compatible inference server with lossless CTC-drafter speculative decoding."""

__version__ = "0.1.0"
