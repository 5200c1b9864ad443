"""Draft models for speculative decoding: the CTC draft module, the Medusa baseline, n-gram lookup,
CTC collapse and candidate trees, and the tools to train them."""
