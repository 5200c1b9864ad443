"""DrafterGuard: every call the engine makes into its drafter, with faults contained.

A draft only ever changes speed, never output: verification keeps exactly the tokens the base model
decides (accept.py). So a drafter that raises must cost speed only. The guard is the one place the
engine calls a drafter (start, observe, propose, release; `needs_hidden` and `tiers` are read once,
here). A call that raises is logged and counted (`errors`, exported as `ctc_drafter_errors_total`),
and drafting stops for every sequence the call was about: its drafter state is now unknown (an
observe that raised may have missed tokens), and a sequence that does not draft decodes plainly, to
the same output. The guard releases such a sequence in the drafter at once, so its drafter state
(a CTC cache slot) is not held for nothing. After `max_errors` failed calls among the drafter's last
`window` calls, drafting stops for the whole drafter, with one log line: a drafter that keeps
failing would otherwise cost a log line and a wasted call per request for the rest of the run.

Requests that do not draft (`speculative: false`) are never shown to the drafter at all, so no
drafter fault can reach them. The guard itself never raises.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from drafter.base import Drafter, LookAhead, ProposeRequest
from drafter.tree import TokenTree
from server.engine.accept import check_tree
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class DrafterGuardConfig:
    max_errors: int = 8  # failed calls among the last `window` that switch the drafter off
    window: int = 100  # a flaky call now and then costs its sequences' drafts, not the drafter's

    def __post_init__(self) -> None:
        if not 1 <= self.max_errors <= self.window:
            raise ValueError("need 1 <= max_errors <= window")


class DrafterGuard:
    def __init__(self, drafter: Drafter | None, vocab_size: int, config: DrafterGuardConfig | None = None):
        self.drafter, self.vocab_size = drafter, vocab_size
        self.config = config or DrafterGuardConfig()
        self.errors = 0  # failed drafter calls since start
        self._recent: deque[bool] = deque(maxlen=self.config.window)  # True = that call failed
        self._live: set[str] = set()  # sequences the drafter holds state for
        self.name = "none"
        self.needs_hidden, self.tiers = False, ("full",)
        if drafter is not None:
            try:
                self.name = str(drafter.name)
                self.needs_hidden, self.tiers = bool(drafter.needs_hidden), tuple(drafter.tiers) or ("full",)
            except Exception:
                self.drafter = None
                self.errors += 1
                log.exception("drafter %s is unusable; decoding without drafts", self.name)

    @property
    def enabled(self) -> bool:
        return self.drafter is not None

    def wants(self, seq: Sequence) -> bool:
        """Does the drafter follow this sequence (so it must be shown what enters its cache)?"""
        return seq.request_id in self._live

    def wants_hidden(self, seq: Sequence) -> bool:
        """Must `observe` be given this sequence's hidden states (it follows it, and reads them)?"""
        return self.needs_hidden and self.wants(seq)

    def start(self, seq: Sequence) -> None:
        if self.drafter is None or not (seq.params.speculative and seq.drafting):
            return
        self._live.add(seq.request_id)  # before the call: a start that fails half-way is released too
        if not self._call(self.drafter.start, "start", seq.request_id, list(seq.prompt_ids)):
            self._stop(seq)

    def observe(self, seq: Sequence, token_ids: list[int], hidden: torch.Tensor | None) -> None:
        if self.drafter is not None and seq.request_id in self._live:
            if not self._call(self.drafter.observe, "observe", seq.request_id, token_ids, hidden):
                self._stop(seq)

    def propose(self, decode: list[tuple[Sequence, int]], tier: int = 0) -> list[TokenTree]:
        """A tree per decoding sequence; a root-only tree (plain decoding) for a budget of 0, a
        sequence that does not draft, or a failed call."""
        trees = [TokenTree.chain(seq.pending_token, []) for seq, _ in decode]
        asks = [(i, seq, ProposeRequest(seq.request_id, seq.pending_token, b, self._tier(seq, tier)))
                for i, (seq, b) in enumerate(decode) if b > 0 and seq.request_id in self._live]
        if self.drafter is None or not asks:
            return trees
        proposed = self._call(self.drafter.propose, "propose", [r for _, _, r in asks])
        if proposed is not None:
            try:
                proposed = list(proposed)
                if len(proposed) != len(asks):
                    raise ValueError(f"{len(proposed)} trees for {len(asks)} requests")
            except Exception as exc:
                proposed = self._fault("propose", str(exc))
        if proposed is None:
            for _, seq, _ in asks:
                self._stop(seq)
            return trees
        for (i, seq, r), tree in zip(asks, proposed):
            try:
                problem = self._check(tree, r)
            except Exception as exc:
                problem = f"an unreadable tree ({type(exc).__name__})"
            if problem is None:
                trees[i] = tree
            else:  # a bad tree would fail the verify forward of the whole batch
                self._fault("propose", f"{seq.request_id}: {problem}")
                self._stop(seq)
        return trees

    def look_ahead(self, seqs: list[Sequence], ahead: LookAhead) -> torch.Tensor | None:
        """The drafter's look-ahead for these sequences (base.Drafter.look_ahead): a device tensor to
        copy to the host with the step's accepted paths, or None. A failure stops drafting for them."""
        if self.drafter is None:
            return None
        values = self._call(self.drafter.look_ahead, "look-ahead", ahead)
        if values is True:  # None from the drafter: nothing to look ahead for
            return None
        if values is not None and not isinstance(values, torch.Tensor):
            values = self._fault("look-ahead", f"a {type(values).__name__} instead of a tensor")
        if values is None:
            self.drop_look_ahead()
            for seq in seqs:
                self._stop(seq)
        return values

    def take_look_ahead(self, seqs: list[Sequence], values: torch.Tensor) -> None:
        """`look_ahead`'s tensor, copied to the host."""
        if self.drafter is not None and self._call(self.drafter.take_look_ahead, "look-ahead", values) is None:
            self.drop_look_ahead()
            for seq in seqs:
                self._stop(seq)

    def drop_look_ahead(self) -> None:
        """The step that looked ahead did not complete: the drafter forgets it."""
        if self.drafter is not None and self._call(self.drafter.drop_look_ahead, "look-ahead") is None:
            self._disable()  # its per-sequence state is unknown now

    def looks_ahead(self, seq: Sequence, tier: int) -> bool:
        """Would this sequence draft with the drafter's full tier next step, as it did this step?"""
        return seq.request_id in self._live and self._tier(seq, tier) == 0

    def _tier(self, seq: Sequence, tier: int) -> int:
        """A grammar-constrained request drafts with the drafter's cheapest tier (a hybrid's lookup
        alone): the learned drafters were trained on free text, and under a JSON schema the grammar
        prunes most of what they propose while their forward still costs its time (BENCHMARKS.md,
        "Constrained decoding"). Lookup drafts the schema's repeated keys and the model's own text."""
        return tier if seq.params.grammar is None else len(self.tiers) - 1

    def release(self, seq: Sequence) -> None:
        if seq.request_id in self._live:
            self._live.discard(seq.request_id)
            if self.drafter is not None:
                self._call(self.drafter.release, "release", seq.request_id)

    # -- faults ----------------------------------------------------------------------------------
    def _check(self, tree, request: ProposeRequest) -> str | None:
        """What is wrong with a proposed tree, or None: it must be a valid tree rooted at the pending
        token, within the budget, of token ids the base model has."""
        if not isinstance(tree, TokenTree):
            return f"a {type(tree).__name__} instead of a TokenTree"
        try:
            check_tree(tree.tokens, tree.parents)
        except (TypeError, ValueError) as exc:
            return str(exc)
        if len(tree.depths) != tree.num_nodes:
            return "depths do not match the nodes"
        if tree.tokens[0] != request.pending_token:
            return f"rooted at {tree.tokens[0]}, not at the pending token {request.pending_token}"
        if tree.num_nodes - 1 > request.budget:
            return f"{tree.num_nodes - 1} draft nodes over a budget of {request.budget}"
        if min(tree.tokens) < 0 or max(tree.tokens) >= self.vocab_size:
            return f"a token id outside [0, {self.vocab_size})"
        return None

    def _call(self, method, what: str, *args):
        """method(*args), or None if it raised (logged, counted). Methods that return nothing
        succeed as True."""
        try:
            result = method(*args)
        except Exception:
            return self._fault(what, None)
        self._recent.append(False)
        return True if result is None else result

    def _fault(self, what: str, problem: str | None) -> None:
        """Count and log one failed call (`problem`: what was wrong, or None for the exception being
        handled); switch the drafter off once too many recent calls failed."""
        self.errors += 1
        self._recent.append(True)
        log.error("drafter %s: %s %s; the sequences it concerned decode on without drafts", self.name, what,
                  f"failed: {problem}" if problem else "raised", exc_info=problem is None)
        if sum(self._recent) >= self.config.max_errors:
            self._disable()
        return None

    def _stop(self, seq: Sequence) -> None:
        """No more drafts for this sequence; let the drafter drop its state."""
        seq.drafting = False
        self.release(seq)

    def _disable(self) -> None:
        if self.drafter is None:
            return
        log.error("drafter %s failed %d of its last %d calls; decoding without drafts from now on", self.name,
                  sum(self._recent), len(self._recent))
        drafter, self.drafter = self.drafter, None
        for seq_id in sorted(self._live):
            try:
                drafter.release(seq_id)
            except Exception:
                self.errors += 1
                log.exception("drafter %s: release of %s raised", self.name, seq_id)
        self._live.clear()
