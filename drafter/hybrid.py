"""A learned drafter (CTC or Medusa) and prompt lookup, merged into one draft tree per step.

The two are strong in different places. Prompt lookup (ngram.py) is nearly free and, where the
text repeats itself (an answer quoting its question, step-by-step arithmetic reusing its numbers,
a model's own repetition), it drafts long runs that are almost always accepted; elsewhere it has
nothing. The learned drafter drafts everywhere, at the price of a forward pass. Per sequence and
step:

- lookup runs first. Its candidates enter the trie ranked above the learned drafter's when they
  come from a match of at least `lookup_min_ngram` tokens. A shorter match is weak evidence: its
  candidates get the score `weak_score`, a log-probability among the learned drafter's candidates'
  (-4.5: the best of -3 to -6 for the demo model's acceptance, on GSM8K and on MT-bench:
  BENCHMARKS.md, "Where a weak lookup match ranks");
- the learned drafter is not asked for this sequence this step where lookup alone drafts it:
  - where the strong candidates fill the budget (their trie has at least `budget` nodes). Every
    learned node ranks below every strong one, so the learned drafter could not place a node of
    its own (at most reorder lookup's among themselves): its forward would be wasted. Common
    where budgets are small: one match drafts up to 8 tokens (`NgramDrafter.max_depth`), a whole
    8-node tree (on the demo model at batch 1 with 8-node trees: 1.84-1.85x -> 1.87-1.90x at the
    same acceptance; BENCHMARKS.md, "A draft nobody could use");
  - where lookup matched at least `skip_learned_ngram` tokens: the text is repeating. This one
    costs acceptance where the budget has room for both (None: never. On the demo model it costs
    little, 3.61 -> 3.54 for the CTC drafter and 4.47 -> 4.28 for the longer EAGLE-style one,
    whose draft time it cuts by a fifth; BENCHMARKS.md, "The lookup hybrid's skip threshold").
  The learned drafter's context is not lost: a drafter with its own cache (CTC) catches up on
  every token it skipped in its next forward;
- otherwise the learned drafter's candidates join the trie, which keeps the best `budget` nodes
  (`build_trie`: a node's value comes from the scores of the candidates through it, by the
  learned drafter's rule, `Drafter.merge`);
- and lookup extends them: where a learned candidate's last tokens (with the text before it, an
  n-gram of at least 2 tokens) occurred earlier in the text, what followed there, up to
  `extend_depth` tokens, joins the trie as a longer candidate, ranked a little below the candidate
  itself. The learned drafter spells at most its K labels; where the text repeats, this carries
  its draft on at no cost (on the demo model's GSM8K prompts: tau 3.65 -> 3.77; BENCHMARKS.md,
  "Lookup carries learned drafts on").

Its second tier is lookup alone (`tiers`): where the learned forward costs more than it adds (a
large batch on a CPU, where the base model is compute-bound) the governor drafts with lookup
only, which costs about nothing, rather than with nothing.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from drafter.base import Drafter, LookAhead, ProposeRequest
from drafter.ngram import NgramDrafter
from drafter.tree import TokenTree, build_trie, trie_size

# Lookup candidates ranked above every learned candidate get scores above any log-probability (<= 0).
_STRONG = 1.0
WEAK_SCORE = -4.5  # LookupHybridDrafter.weak_score's default (module docstring)
# Extending learned candidates by lookup (module docstring): the continuation of an n-gram of at
# least EXTEND_MIN_NGRAM tokens ending the candidate, up to extend_depth tokens, ranked EXTEND_PENALTY
# (a log-probability) below the candidate it extends.
EXTEND_DEPTH = 8
EXTEND_MIN_NGRAM = 2
EXTEND_PENALTY = -1.0


class LookupHybridDrafter(Drafter):
    def __init__(self, learned: Drafter, lookup: NgramDrafter | None = None, lookup_min_ngram: int = 2,
                 skip_learned_ngram: int | None = 3, weak_score: float = WEAK_SCORE,
                 extend_depth: int = EXTEND_DEPTH):
        self.learned = learned
        self.weak_score = weak_score
        self.lookup = lookup if lookup is not None else NgramDrafter()
        self.lookup_min_ngram = lookup_min_ngram
        self.skip_learned_ngram = skip_learned_ngram
        self.name = f"{learned.name}+ngram"
        self.needs_hidden = learned.needs_hidden
        self.tiers = (self.name, "ngram")  # 1: lookup only
        self.extend_depth = extend_depth
        self.learned_skipped = 0  # requests whose learned draft lookup made unnecessary (for logs/benchmarks)

    @property
    def skip_learned_ngram(self) -> int | None:
        return self._skip_learned_ngram

    @skip_learned_ngram.setter
    def skip_learned_ngram(self, n: int | None) -> None:
        if n is not None and n < self.lookup_min_ngram:
            raise ValueError(f"skip_learned_ngram must be >= lookup_min_ngram ({self.lookup_min_ngram}) or None, got {n}")
        self._skip_learned_ngram = n

    def start(self, seq_id: str, prompt_ids: list[int]) -> None:
        self.learned.start(seq_id, prompt_ids)
        self.lookup.start(seq_id, prompt_ids)

    def observe(self, seq_id: str, token_ids: list[int], hidden: torch.Tensor | None) -> None:
        self.learned.observe(seq_id, token_ids, hidden)
        self.lookup.observe(seq_id, token_ids)

    def release(self, seq_id: str) -> None:
        self.learned.release(seq_id)
        self.lookup.release(seq_id)

    def look_ahead(self, ahead: LookAhead) -> torch.Tensor | None:
        return self.learned.look_ahead(ahead)

    def take_look_ahead(self, values: torch.Tensor) -> None:
        self.learned.take_look_ahead(values)

    def drop_look_ahead(self) -> None:
        self.learned.drop_look_ahead()

    def _lookup_fills(self, r: ProposeRequest, looked: list[list[int]], n: int) -> float:
        """Up to how large a budget lookup alone drafts this step (module docstring): the nodes of
        its strong candidates at their full depth (a budget-k tree of them then has k nodes: for
        every k up to this, the learned drafter could not place one), everything where it matched
        `skip_learned_ngram` tokens, nothing without a strong match."""
        if n < self.lookup_min_ngram:
            return 0
        skip = self.skip_learned_ngram
        if skip is not None and n >= skip:
            return math.inf
        if r.budget < self.lookup.max_depth:  # `looked` was cut to the budget's depth
            looked, _ = self.lookup.lookup(r, self.lookup.max_depth)
        return trie_size(looked)

    def propose(self, requests: list[ProposeRequest]) -> list[TokenTree]:
        found = [self.lookup.lookup(r) for r in requests]
        fills = [self._lookup_fills(r, looked, n) for r, (looked, n) in zip(requests, found)]
        ask = [i for i, (r, fill) in enumerate(zip(requests, fills)) if r.tier == 0 and fill < r.budget]
        self.learned_skipped += sum(r.tier == 0 for r in requests) - len(ask)
        learned = dict(zip(ask, self.learned.candidates([requests[i] for i in ask]))) if ask else {}
        trees = []
        for i, (r, (looked, n)) in enumerate(zip(requests, found)):
            top = _STRONG if n >= self.lookup_min_ngram else self.weak_score
            cands = list(looked)
            scores = [top - 0.01 * rank for rank in range(len(looked))]  # most recent occurrence first
            for c in learned.get(i, []):
                cands.append(c.tokens)
                scores.append(c.score)
                # Its extension ranks below its own len(c.tokens) nodes: with no more room than those, none fits.
                if not self.extend_depth or len(c.tokens) >= r.budget:
                    continue
                more = self.lookup.continuation(r.seq_id, [r.pending_token, *c.tokens], self.extend_depth,
                                                EXTEND_MIN_NGRAM)
                if more:
                    cands.append(c.tokens + more)
                    scores.append(c.score + EXTEND_PENALTY)
            tree = build_trie(r.pending_token, cands, scores, max_nodes=r.budget, merge=self.learned.merge)
            trees.append(dataclasses.replace(tree, forward_above=fills[i]))  # for the governor's prices
        return trees
