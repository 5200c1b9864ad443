"""Which conversations each rank trains on at each step.

Two rules, both functions of (step, rank) alone, so a resumed run (or any rank) recomputes the
same batches without communicating:

- `FixedCountBatches`: a fixed number of conversations per rank and step, taken as consecutive
  windows of one shuffled order that wraps around (the original rule; it suits a small model
  whose conversations are all short).
- `TokenBudgetBatches` (`--max-tokens-per-batch`): conversations packed greedily, in a shuffled
  order that changes every epoch, into batches of at most a token budget. A step's cost follows
  its token count, not its conversation count, so a budget keeps memory and step time flat when
  conversation lengths spread widely (a 7-8B model's chat data: a few dozen to a few thousand
  tokens). Every conversation it is given is used exactly once per epoch. Under DDP, an epoch's batches are
  dealt round-robin to the ranks, so their count must be a multiple of the world size: packing
  splits its batches with most conversations in two until it is (each piece still fits).

Ranks step together, so under DDP every rank's gradient gets the same weight whatever its batch's
token count; the same holds for any data-parallel loader with per-rank mean losses.
"""

from __future__ import annotations

import random


class FixedCountBatches:
    """`per_step` conversations per rank and step from one shuffled order (seeded)."""

    def __init__(self, num_conversations: int, per_step: int, world: int, seed: int):
        self.order = list(range(num_conversations))
        random.Random(seed).shuffle(self.order)
        self.per_step, self.world = per_step, world

    def ids(self, step: int, rank: int) -> list[int]:
        # Step s takes a fixed window of the shuffled order, so a resumed run sees the same data.
        n = len(self.order)
        start = (step * self.per_step * self.world + rank * self.per_step) % n
        return [self.order[(start + j) % n] for j in range(self.per_step)]


def pack_epoch(lengths: list[int], max_tokens: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of conversation indices: each index exactly once, each batch at most
    `max_tokens` tokens (sum of its conversations' lengths), the number of batches a multiple of
    `world`. Deterministic in (seed, epoch)."""
    order = list(range(len(lengths)))
    random.Random(f"{seed}/{epoch}").shuffle(order)  # a str seed hashes the same in every process
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return _split_to_multiple(batches, world)


def _split_to_multiple(batches: list[list[int]], world: int) -> list[list[int]]:
    """Split the batch with most conversations in two until the count divides by `world`. At most
    world - 1 splits; a piece of a batch within the budget is within it too."""
    while len(batches) % world:
        b = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[b]) < 2:
            raise ValueError(
                f"{sum(map(len, batches))} conversations cannot be dealt evenly to {world} ranks within "
                "the token budget; a budget of at least twice the longest conversation always can"
            )
        half = len(batches[b]) // 2
        batches[b : b + 1] = [batches[b][:half], batches[b][half:]]
    return batches


class TokenBudgetBatches:
    """Token-budget batches, epoch after epoch; rank r takes batches r, r + world, ... of each epoch.
    `ids`: the conversations to use (default all), `lengths` being theirs."""

    def __init__(self, lengths: list[int], max_tokens: int, world: int, seed: int, ids: list[int] | None = None):
        self.conversation_ids = list(range(len(lengths))) if ids is None else ids
        if len(self.conversation_ids) != len(lengths):
            raise ValueError(f"{len(self.conversation_ids)} conversation ids for {len(lengths)} lengths")
        if not lengths:
            raise ValueError("no conversations to train on")
        if max(lengths) > max_tokens:
            raise ValueError(
                f"--max-tokens-per-batch {max_tokens} is below the longest conversation ({max(lengths)} tokens): "
                "raise it, or distill with a smaller --max-len"
            )
        if len(lengths) < world:
            raise ValueError(f"{len(lengths)} conversations cannot feed {world} ranks")
        self.lengths, self.max_tokens, self.world, self.seed = lengths, max_tokens, world, seed
        self._epochs: list[list[list[int]]] = []  # packed on first use and kept: locate() walks them
        self._first_step: list[int] = [0]  # _first_step[e]: the global step that starts epoch e
        # Batches hold positions in `lengths`; ids() turns them into conversation ids.

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            batches = pack_epoch(self.lengths, self.max_tokens, self.world, self.seed, len(self._epochs))
            self._epochs.append(batches)
            self._first_step.append(self._first_step[-1] + len(batches) // self.world)
        return self._epochs[e]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of a global step."""
        e = 0
        while True:
            self.epoch(e)
            if step < self._first_step[e + 1]:
                return e, step - self._first_step[e]
            e += 1

    def ids(self, step: int, rank: int) -> list[int]:
        e, s = self.locate(step)
        return [self.conversation_ids[j] for j in self.epoch(e)[s * self.world + rank]]
