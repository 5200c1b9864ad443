"""The interface every drafter offers the engine: n-gram lookup, CTC, Medusa.

The engine owns the base model and the KV cache; a drafter only ever sees what the engine
hands it. Per sequence the engine calls `start` once, `observe` after every forward with the
tokens that entered the base model's KV cache (and, for drafters that want them, the base
model's final-norm hidden states of those tokens), `propose` when it wants a draft tree rooted
at the sequence's pending token, and `release` when the sequence ends. Trees come back as
`TokenTree`s, already collapsed and deduplicated, within the node budget the engine asked for.

A drafter may offer cheaper ways to draft besides its full one (`tiers`): the lookup hybrid can
leave its learned drafter out. The engine's speculation governor measures each and asks for one
per step (`ProposeRequest.tier`), so a drafter that costs more than it saves under load is not paid
for where a cheaper tier still gains.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass

import torch

from drafter.candidates import Candidate, candidates_to_tree
from drafter.tree import TokenTree


@dataclass
class ProposeRequest:
    seq_id: str
    pending_token: int  # the tree's root: emitted, not yet in the KV cache
    budget: int  # at most this many draft (non-root) nodes; > 0
    tier: int = 0  # which of the drafter's `tiers` drafts it (0: its full way)


@dataclass
class LookAhead:
    """What a drafter may draft the NEXT step from, before this step's accepted paths reach the host
    (`Drafter.look_ahead`). Per verified sequence k, on the device: its accepted path's base hidden
    states and the token each path node emitted (the token after it; the last is the next pending
    token), padded to the deepest tree + 1, and the path's length. `roots` are this step's pending
    tokens (the path's first tokens), known on the host."""

    seq_ids: list[str]
    roots: list[int]
    hidden: torch.Tensor  # (S, D + 1, H) base final-norm hidden states at the path's nodes
    tokens: torch.Tensor  # (S, D + 1) int64: the token after each path node (>= 0; padding arbitrary)
    lengths: torch.Tensor  # (S,) int64: path length, 1..D + 1


class Drafter(ABC):
    name: str = "drafter"
    needs_hidden: bool = False  # does observe() need the base model's hidden states?
    tiers: tuple[str, ...] = ("full",)  # ways to draft, dearest first: what ProposeRequest.tier indexes
    # How the trie values a node from the scores of `candidates()` through it (tree.build_trie):
    # "max" where every node's own path is a candidate, "sum" where candidates are whole drafts.
    merge: str = "max"

    def start(self, seq_id: str, prompt_ids: list[int]) -> None:  # noqa: B027 - optional hook
        pass

    def observe(self, seq_id: str, token_ids: list[int], hidden: torch.Tensor | None) -> None:  # noqa: B027
        """`token_ids` just entered the base KV cache; `hidden` is (len(token_ids), H) or None."""

    def propose(self, requests: list[ProposeRequest]) -> list[TokenTree]:
        """One draft tree per request, rooted at its pending token (a root-only tree = no draft),
        within the request's node budget. By default the trie of `candidates()`."""
        return [candidates_to_tree(r.pending_token, c, r.budget, self.merge)
                for r, c in zip(requests, self.candidates(requests))]

    def candidates(self, requests: list[ProposeRequest]) -> list[list[Candidate]]:
        """Scored draft sequences per request, before they are merged into a tree. Learned
        drafters implement this (and inherit `propose`), so they can also be combined with others
        (hybrid.py); a drafter that builds its trees another way overrides `propose` instead."""
        raise NotImplementedError(f"the {self.name} drafter does not expose candidates")

    def release(self, seq_id: str) -> None:  # noqa: B027
        pass

    # Look-ahead (optional). On the all-nodes path the engine hands the drafter this step's accepted
    # paths while they are still on the device; a drafter that can, runs next step's forward on them
    # there and returns what its next `propose` needs from the device, which then travels to the host
    # in the same copy as the accepted paths: one copy per step instead of two. `observe` is still
    # called as usual afterwards (with the tokens of the path the look-ahead already took in).
    def look_ahead(self, ahead: LookAhead) -> torch.Tensor | None:
        """Next step's device work for some of `ahead`'s sequences, or None (the default: none)."""
        return None

    def take_look_ahead(self, values: torch.Tensor) -> None:  # noqa: B027
        """`look_ahead`'s tensor, now on the host."""

    def drop_look_ahead(self) -> None:  # noqa: B027
        """Forget a look-ahead whose step did not complete (its `observe` calls will not come)."""


class LastHiddenDrafter(Drafter):
    """A drafter of heads over the base model's hidden state at the last committed position
    (Medusa, Hydra): all it keeps per sequence is that one vector."""

    needs_hidden = True

    def __init__(self, model: torch.nn.Module, max_slots: int = 0, max_len: int = 0):
        self.model = model.eval()
        self.last_hidden: dict[str, torch.Tensor] = {}

    def observe(self, seq_id: str, token_ids: list[int], hidden: torch.Tensor | None) -> None:
        self.last_hidden[seq_id] = hidden[-1]

    def release(self, seq_id: str) -> None:
        self.last_hidden.pop(seq_id, None)
