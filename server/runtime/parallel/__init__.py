"""Tensor parallelism (`--tensor-parallel-size N`): one base model split across N processes.

Megatron-style, as in Shoeybi et al. 2019 (arXiv 1909.08053): every decoder layer's attention heads
and MLP columns are split across the ranks. q/k/v and gate/up are column-parallel (rank r holds its
heads' rows, its KV cache holds only those heads), o and down are row-parallel (rank r holds the
matching input columns; their partial outputs are summed by one all-reduce each), so every rank
ends each layer with the same full hidden state.

Rank 0 is the `ctc-serve` process: it runs the API, the scheduler, the drafter and the sampler, and
owns the vocabulary (embedding and LM head, whole). It embeds each step's tokens, sends the step
(its `ForwardItem`s) to the other ranks over a pipe each and the embeddings by one broadcast, and
computes logits itself from the final hidden state, which it has in full: so the engine and the
drafters see exactly what they see at TP=1. The other ranks (`worker.py`) hold their layer shards
only and replay the step. A full vocabulary on rank 0 costs it (embedding + LM head) more memory than
the workers; in exchange the engine's many small LM-head calls (one per tree depth, the drafters')
need no collective at all.

- `shard.py`: what each rank holds (the sharding pass, the checkpoint slices it loads);
- `group.py`: rank 0's side (start the workers, send steps, watch them, shut them down);
- `worker.py`: the other ranks' process.
"""
