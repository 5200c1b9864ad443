"""Hot ops, one per file: a Triton kernel for CUDA plus a plain-torch reference that is both the
CPU fallback and the test oracle."""
