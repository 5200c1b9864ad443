"""LLMEngine: the synchronous engine core one worker thread drives (see types.EngineCore).

`step()` = schedule -> propose -> one batched verify forward (prefill chunks + trees) -> decide
and accept per sequence -> commit KV -> stop checks and incremental detokenization -> deltas.

Invariant: every admitted request gets exactly one final delta (`finish_reason` set), whatever
fails. A client waits for that delta, so a request that ends without one hangs until the client
times out. How faults are contained, from cheapest to dearest:
- the drafter: every call goes through `DrafterGuard`, which never raises; a failure stops
  drafting for the sequences it concerned, which decode on plainly to the same output;
- sampling: decided sequence by sequence when the batched call fails; a failing sequence fails
  its request;
- the forward (verify/prefill/decode, accept): if the batched forward fails, each request is run
  alone, and only those that fail alone fail (it changes no engine state before it succeeds);
- finishing one request (its KV bookkeeping, stop checks, the detokenizer): fails that request
  only; `_finish` never raises, so its final delta is always made;
- anything else in the step (the KV commit): fails the step's unfinished requests.
A failed request ends with FinishReason.ERROR and an `error` message; the engine serves on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from drafter.base import Drafter, LookAhead
from drafter.tree import TokenTree
from server.engine import speculate
from server.engine.accept import AcceptResult
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.drafter_guard import DrafterGuard, DrafterGuardConfig
from server.engine.grammar import Grammars
from server.engine.logits_process import LogitsProcessor, uses_processing
from server.engine.scheduler import DraftOutcome, Plan, Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, Status
from server.engine.sampler import token_logprobs
from server.engine.types import EngineError, EngineStats, FinishReason, RequestDelta, SamplingParams, TokenLogprob
from server.runtime.batch import ForwardItem
from server.runtime.host import host_list, to_device
from server.runtime.model import CausalLM

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_model_len: int = 2048
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    drafter_guard: DrafterGuardConfig = field(default_factory=DrafterGuardConfig)
    # How acceptance gets the decided tokens (speculate.py): the path walk (least compute, one host
    # round trip per depth) or all nodes at once (one LM-head call, one copy); AUTO picks by device.
    acceptance: speculate.Acceptance = speculate.Acceptance.AUTO
    # The path walk's look-ahead: nodes down each walk's likeliest branch that an LM-head call also
    # decides (speculate.accept); 0: only the nodes the walks stand on. Outputs are the same.
    path_ahead: int = speculate.PATH_AHEAD

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.path_ahead < 0:
            raise ValueError(f"path_ahead must be >= 0, got {self.path_ahead}")


@dataclass
class _Prefilled:
    """A prefill chunk that went through the forward (LLMEngine._forward)."""

    seq: Sequence
    chunk: list[int]
    hidden: torch.Tensor | None  # (len(chunk), H) for a drafter that wants them
    token: int | None = None  # the first generated token, if the prompt is now complete
    logprob: TokenLogprob | None = None


@dataclass
class _Verified:
    """A decoding sequence's tree that went through the forward and the acceptance walk."""

    seq: Sequence
    budget: int  # draft nodes it was allowed (0: plain)
    tree: TokenTree
    result: AcceptResult
    hidden: torch.Tensor | None  # (len(result.path), H) for a drafter that wants them
    logprobs: list[TokenLogprob | None]


@dataclass
class _Forwarded:
    """What `LLMEngine._forward` found, before any engine state changes."""

    prefilled: list[_Prefilled] = field(default_factory=list)
    verified: list[_Verified] = field(default_factory=list)

    def extend(self, other: _Forwarded) -> None:
        self.prefilled += other.prefilled
        self.verified += other.verified


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer, config: EngineConfig, drafter: Drafter | None = None,
                 model_name: str = "model"):
        cfg = model.config
        if cfg.sliding_window is not None and config.max_model_len > cfg.sliding_window:
            raise EngineError(
                f"this model uses sliding-window attention over {cfg.sliding_window} tokens, which ctc-serve "
                f"does not implement; serve it with max_model_len <= {cfg.sliding_window}"
            )
        self.model, self.tokenizer, self.config, self.drafter = model, tokenizer, config, drafter
        self.guard = DrafterGuard(drafter, cfg.vocab_size, config.drafter_guard)  # every drafter call goes here
        self.acceptance = speculate.Acceptance(config.acceptance).resolve(model.lm_head.weight.device)
        self.model_name = model_name
        self.max_model_len = config.max_model_len
        self.cache = model.make_cache(config.scheduler.max_batch_size, config.max_model_len)
        self.scheduler = Scheduler(config.scheduler, tiers=len(self.guard.tiers))
        self.eos_ids = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.grammars = Grammars(tokenizer, cfg.vocab_size, sorted(self.eos_ids))  # structured outputs
        self.processor = LogitsProcessor(self.grammars)  # logit_bias, penalties, grammar masks
        self._seqs: dict[str, Sequence] = {}  # by Sequence.request_id (a request with n > 1 has n)
        self._outbox: list[RequestDelta] = []  # deltas produced outside step() (aborts)
        # Wall seconds spent per phase since start: where a step's time goes. propose (the drafter),
        # verify (the base model's forward), accept (deciding tokens and walking the trees: on the
        # path walk this includes the LM-head calls at the nodes the walks reach), finish (commit,
        # the drafter's observe, emitting). On an accelerator the forward's kernels run
        # asynchronously, so its time shows up in accept (the first copy to the host waits for them).
        self.phase_seconds: Counter[str] = Counter()

    # -- EngineCore ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._seqs:
            raise EngineError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise EngineError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise EngineError(
                f"the prompt has {len(prompt_token_ids)} tokens; this server's context is {self.max_model_len} "
                f"tokens and at least one must be left to generate"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        slots = min(self.config.scheduler.max_batch_size, self.cache.max_slots)
        if params.n > slots:
            raise EngineError(f"n={params.n} sequences do not fit in this server's batch of {slots}")
        seqs = [Sequence(request_id if i == 0 else f"{request_id}#{i}", list(prompt_token_ids), params,
                         IncrementalDetokenizer(self.tokenizer, params.stop), index=i, group_id=request_id)
                for i in range(params.n)]
        try:
            for seq in seqs:
                self.grammars.start(seq)  # refuses a grammar that does not compile
        except Exception:
            for seq in seqs:
                self.grammars.release(seq)
            raise
        seqs[0].forks = seqs[1:]
        self._seqs.update((s.request_id, s) for s in seqs)
        self.scheduler.add(seqs[0])

    def abort_request(self, request_id: str) -> None:
        for seq in [s for s in self._seqs.values() if s.group_id == request_id]:
            if not seq.finished:
                self._finish(seq, FinishReason.ABORT)
                self._outbox.append(self._delta(seq, [], ""))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._outbox)

    def forget_measurements(self) -> None:
        """Start the governor's arms and the phase timers afresh, as in a new engine (after a
        warm-up, whose step times include one-time compilation). Only while idle."""
        if self.has_work():
            raise EngineError("forget_measurements needs an idle engine")
        self.scheduler = Scheduler(self.config.scheduler, tiers=self.scheduler.governor.tiers)
        self.phase_seconds.clear()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.cache.usage(),
            drafter_errors=self.guard.errors,
        )

    def step(self) -> list[RequestDelta]:
        deltas, self._outbox = self._outbox, []
        for seq in self.scheduler.admit(self.cache.can_allocate, self.cache.allocate):
            self.guard.start(seq)
        self._fork_ready(deltas)
        plan = self.scheduler.plan(speculation_enabled=self.guard.enabled)
        if plan.empty:
            return deltas
        try:
            self._run(plan, deltas)
        except Exception as exc:  # a batched part failed: fail the step's unfinished requests, keep serving
            self.guard.drop_look_ahead()
            log.exception("engine step failed; failing the unfinished requests of the %d in it",
                          len(plan.prefill) + len(plan.decode))
            for seq, _ in plan.prefill + plan.decode:
                if not seq.finished:  # a finished one has its final delta in `deltas` already
                    deltas.append(self._fail(seq, exc))
        return deltas

    # -- the step --------------------------------------------------------------------------------
    def _run(self, plan: Plan, deltas: list[RequestDelta]) -> None:
        """Run the plan, appending each request's delta to `deltas` as soon as it is made (so a
        failure part-way keeps the final deltas of the requests that finished before it)."""
        t0 = time.perf_counter()
        decode = [(seq, self._clamp_budget(seq, b)) for seq, b in plan.decode]
        trees = self.grammars.prune([seq for seq, _ in decode], self.guard.propose(decode, plan.tier))
        t1 = time.perf_counter()
        accept0 = self.phase_seconds["accept"]
        retried = False
        try:
            out = self._forward(plan.prefill, decode, trees, plan.tier)
        except Exception:
            self.guard.drop_look_ahead()
            if len(plan.prefill) + len(decode) == 1:
                raise
            # Find the request(s) it fails for: each alone. The forward only writes K/V past each
            # sequence's committed length, so running it again overwrites, never corrupts.
            log.exception("batched forward failed; running its %d requests one by one", len(plan.prefill) + len(decode))
            out, retried = _Forwarded(), True
            solo = [([p], [], []) for p in plan.prefill] + [([], [d], [t]) for d, t in zip(decode, trees)]
            for prefill, dec, tree in solo:
                try:
                    out.extend(self._forward(prefill, dec, tree))
                except Exception as exc:
                    seq = (prefill or dec)[0][0]
                    log.exception("request %s failed in the forward", seq.request_id)
                    deltas.append(self._fail(seq, exc))
        t2 = time.perf_counter()

        for p in out.prefilled:
            try:
                self.cache.advance(p.seq.slot, len(p.chunk))
                p.seq.num_prefilled += len(p.chunk)
                self.guard.observe(p.seq, p.chunk, p.hidden)
                if p.seq.forks and p.hidden is not None:  # the forks' drafter sees the same prefix
                    p.seq.shared_hidden.append(p.hidden)
                if p.token is not None:
                    p.seq.status = Status.DECODE
                    deltas.append(self._emit(p.seq, [p.token], [p.logprob]))
            except Exception as exc:
                log.exception("request %s failed after its prefill", p.seq.request_id)
                deltas.append(self._fail(p.seq, exc))
        outcomes = []
        speculate.commit(self.cache, [v.seq for v in out.verified], [v.result for v in out.verified])
        for v in out.verified:
            try:
                self.guard.observe(v.seq, [v.tree.tokens[i] for i in v.result.path], v.hidden)
                if v.budget > 0:  # asked for a draft, even if the drafter found none
                    outcomes.append(DraftOutcome(v.budget, v.tree.num_draft_tokens, v.result.path[1:],
                                                 v.tree.forward_above))
                delta = self._emit(v.seq, v.result.emitted, v.logprobs)
                if v.tree.num_nodes > 1:
                    delta.speculated = True
                    delta.num_draft_tokens = v.tree.num_nodes - 1
                    delta.num_accepted_tokens = v.result.num_accepted
                deltas.append(delta)
            except Exception as exc:
                log.exception("request %s failed after its verification", v.seq.request_id)
                deltas.append(self._fail(v.seq, exc))
        t3 = time.perf_counter()
        self.phase_seconds.update(propose=t1 - t0, verify=t2 - t1 - (self.phase_seconds["accept"] - accept0),
                                  finish=t3 - t2)
        if not retried:  # (a retried step's time is no step's cost)
            self.scheduler.record(plan, t3 - t0)
        if not plan.prefill and decode and not retried:  # a pure decode step: what the governor compares
            try:
                self.scheduler.governor.record(len(decode), plan.budget, t3 - t0, outcomes, plan.cap, plan.sampled,
                                               plan.tier)
            except Exception:  # it only tunes speed: never worth a request
                log.exception("speculation governor failed to record a step")

    def _fork_ready(self, deltas: list[RequestDelta]) -> None:
        """Fork every sequence whose shared prefix is in: its FORKED siblings get a copy of the
        prefix's K/V and drafter context, and all of them go on to prefill the last prompt token."""
        for seq in [s for s in self.scheduler.running if s.forks and s.num_prefilled == s.shared_prefix]:
            forks, hidden = seq.forks, seq.shared_hidden
            seq.forks, seq.shared_hidden = [], []
            prefix = seq.prompt_ids[: seq.shared_prefix]
            for fork in forks:
                try:
                    self.cache.copy_prefix(seq.slot, fork.slot, len(prefix))
                    fork.num_prefilled, fork.status = len(prefix), Status.PREFILL
                    fork.drafting = seq.drafting and self.guard.wants(seq)
                    self.guard.start(fork)
                    if prefix:
                        self.guard.observe(fork, prefix, torch.cat(hidden) if self.guard.wants_hidden(fork) else None)
                except Exception as exc:
                    log.exception("request %s: forking failed", fork.request_id)
                    deltas.append(self._fail(fork, exc))

    def _forward(self, prefill: list[tuple[Sequence, int]], decode: list[tuple[Sequence, int]],
                 trees: list[TokenTree], look_ahead_tier: int | None = None) -> _Forwarded:
        """verify + decide + accept for these sequences, changing no engine state (the K/V it
        writes lie past every committed length until `commit`/`advance` keep them). On the
        all-nodes path with `look_ahead_tier` (the step's drafting tier) the drafter may look
        ahead (`_look_ahead`); its state then waits for the `observe` calls of this step."""
        all_nodes = self.acceptance is speculate.Acceptance.ALL_NODES
        items, positions = [], []
        for seq, n in prefill:
            chunk = seq.prompt_ids[seq.num_prefilled : seq.num_prefilled + n]
            items.append(ForwardItem(seq.slot, self.cache.lengths[seq.slot], chunk))
            last = seq.num_prefilled + n == len(seq.prompt_ids)
            positions.append([n - 1] if last else [])
        for (seq, _), tree in zip(decode, trees):
            items.append(ForwardItem(seq.slot, self.cache.lengths[seq.slot], tree.tokens, tree.parents))
            # all-nodes: every node's logits now; path: speculate.accept computes them where its walks go
            positions.append(list(range(tree.num_nodes)) if all_nodes else [])
        out = speculate.verify(self.model, self.cache, items, positions)
        verified = time.perf_counter()
        base = len(prefill)
        first_rows = [out.rows[b][0] for b in range(base) if positions[b]]  # prefills that completed
        first = [speculate.DecideRow(seq, 0) for (seq, _), pos in zip(prefill, positions) if pos]
        if all_nodes:
            first_tokens, results, logprobs = self._accept_all_nodes(out, first, first_rows, decode, trees,
                                                                     look_ahead_tier)
        else:
            first_tokens, results, logprobs = self._accept_path(out, first, decode, trees)

        result = _Forwarded()
        completed = iter(zip(first_tokens, logprobs[: len(first)]))
        for b, (seq, n) in enumerate(prefill):
            hidden = out.item_hidden(b) if self.guard.wants_hidden(seq) else None
            p = _Prefilled(seq, items[b].tokens, hidden)
            if positions[b]:
                p.token, p.logprob = next(completed)
            result.prefilled.append(p)
        for j, ((seq, budget), tree, res) in enumerate(zip(decode, trees, results)):
            hidden = out.item_hidden(base + j)[res.path] if self.guard.wants_hidden(seq) else None
            result.verified.append(_Verified(seq, budget, tree, res, hidden, logprobs[len(first) + j]))
        self.phase_seconds["accept"] += time.perf_counter() - verified
        return result

    def _accept_path(self, out: speculate.VerifyOutput, first: list[speculate.DecideRow],
                     decode: list[tuple[Sequence, int]], trees: list[TokenTree]):
        """The path walk (speculate.py): at most one LM-head call and one copy to the host per depth.
        Returns (first tokens of the completed prefills, one AcceptResult per tree, logprobs:
        one entry per completed prefill, then one list per tree)."""
        first_tokens = host_list(self._decide(out.logits, first)) if first else []
        logprobs: list = self._logprobs(out.logits, [r.seq for r in first], first_tokens)
        # (walk, node) -> its logits row and decided token, for the log-probabilities of the nodes
        # the walks stand on, computed once they are known (a node decided ahead may never be reached)
        decided: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}

        def decide(logits: torch.Tensor, nodes: list[tuple[int, int]]) -> list[int]:
            rows = [self._row(decode[k][0], trees[k], node) for k, node in nodes]
            tokens = host_list(self._decide(logits, rows))
            decided.update((x, (logits[i], t)) for i, (x, t) in enumerate(zip(nodes, tokens)))
            return tokens

        roots = [out.offsets[len(out.rows) - len(decode) + j] for j in range(len(decode))]
        results = speculate.accept(self.model, out.packed_hidden, roots, trees, decide, self.config.path_ahead)
        # each node a walk stood on emitted its decided token, with its log-probabilities if asked for
        walked = [(k, node) for k, res in enumerate(results) if decode[k][0].params.logprobs is not None
                  for node in res.path]
        found = {}
        if walked:
            rows = torch.stack([decided[x][0] for x in walked])  # (W, V)
            found = dict(zip(walked, self._logprobs(rows, [decode[k][0] for k, _ in walked],
                                                    [decided[x][1] for x in walked])))
        walk_logprobs = [[found.get((k, node)) for node in res.path] for k, res in enumerate(results)]
        return first_tokens, results, logprobs + walk_logprobs

    def _accept_all_nodes(self, out: speculate.VerifyOutput, first: list[speculate.DecideRow], first_rows: list[int],
                          decode: list[tuple[Sequence, int]], trees: list[TokenTree], look_ahead_tier: int | None):
        """The all-nodes walk (speculate.py): every row of `out.logits` (the completed prefills'
        last tokens, then every tree node) decided on the device, the walks run there, one copy to
        the host, which also carries the drafter's look-ahead for the next step; one more copy for
        the emitted tokens' logprob rows if any request asked for them. Returns what `_accept_path`
        returns."""
        base = len(out.rows) - len(decode)
        node_rows = out.rows[base:]
        rows = list(first)
        for (seq, _), tree in zip(decode, trees):
            rows += [self._row(seq, tree, node) for node in range(tree.num_nodes)]
        logits = out.logits  # (M, V): verify laid its rows out in this order (items in order, nodes in order)
        if len(rows) != len(logits):
            raise RuntimeError(f"{len(logits)} logits rows for {len(rows)} decisions")
        decided = self._decide(logits, rows)  # (M,) on the device
        first_decided = decided[to_device(first_rows, decided.device)]  # (P,)
        looked: list[Sequence] = []

        def look_ahead(walks: torch.Tensor) -> list[torch.Tensor]:  # rides in the acceptance's one copy
            found = None if look_ahead_tier is None else self._look_ahead(out, decode, trees, walks, look_ahead_tier)
            if found is None:
                return []
            looked.extend(found[0])
            return [found[1]]

        first_tokens, results, riders = speculate.accept_all_nodes(trees, decided, node_rows, first_decided, look_ahead)
        if riders:
            self.guard.take_look_ahead(looked, riders[0])

        # logprobs of the emitted tokens only: their logits rows, in one batch (one copy)
        seqs = [r.seq for r in first] + [seq for (seq, _), res in zip(decode, results) for _ in res.path]
        lp_rows = first_rows + [node_rows[j][node] for j, res in enumerate(results) for node in res.path]
        tokens = first_tokens + [t for res in results for t in res.emitted]
        found = iter(self._logprobs(logits, seqs, tokens, lp_rows))
        logprobs: list = [next(found) for _ in first]
        logprobs += [[next(found) for _ in res.path] for res in results]
        return first_tokens, results, logprobs

    def _look_ahead(self, out: speculate.VerifyOutput, decode: list[tuple[Sequence, int]], trees: list[TokenTree],
                    walks: torch.Tensor, tier: int) -> tuple[list[Sequence], torch.Tensor] | None:
        """Hand the drafter this step's accepted paths, still on the device, for the sequences that
        drafted with its full tier (they will most likely again): base.Drafter.look_ahead. Returns
        (those sequences, the drafter's tensor for the copy), or None."""
        picked = [j for j, (seq, budget) in enumerate(decode) if budget > 0 and self.guard.looks_ahead(seq, tier)]
        if not picked:
            return None
        device = walks.device
        rows = to_device(picked, device)
        path, emitted = walks[rows, 0], walks[rows, 1]  # (S', D + 1) each, -1 past the path
        base = len(out.offsets) - 1 - len(decode)
        roots = to_device([out.offsets[base + j] for j in picked], device)  # each tree's first packed row
        seqs = [decode[j][0] for j in picked]
        ahead = LookAhead(
            seq_ids=[s.request_id for s in seqs], roots=[trees[j].tokens[0] for j in picked],
            hidden=out.packed_hidden[roots[:, None] + path.clamp(min=0)], tokens=emitted.clamp(min=0),
            lengths=(path >= 0).sum(dim=1),
        )
        values = self.guard.look_ahead(seqs, ahead)
        return None if values is None else (seqs, values)

    def _row(self, seq: Sequence, tree: TokenTree, node: int) -> speculate.DecideRow:
        """Node `node` of `seq`'s tree: its logits decide output position len(output) + depth."""
        return speculate.DecideRow(seq, len(seq.output_ids) + tree.depths[node], node, tree)

    def _decide(self, logits: torch.Tensor, rows: list[speculate.DecideRow]) -> torch.Tensor:
        """(M,) decided tokens on the logits' device; -1 for the rows of a sequence whose deciding
        failed (its token never matches a child, and _emit refuses it: that sequence fails)."""
        if not rows:
            return torch.empty(0, dtype=torch.long, device=logits.device)
        try:
            return speculate.decide(self._process(logits, rows), rows)
        except Exception:
            # Isolate the failing request(s): decide sequence by sequence.
            out = torch.full((len(rows),), -1, dtype=torch.long, device=logits.device)
            groups: dict[int, list[int]] = {}
            for i, r in enumerate(rows):
                groups.setdefault(id(r.seq), []).append(i)
            for idx in groups.values():
                try:
                    mine = [rows[i] for i in idx]
                    out[idx] = speculate.decide(self._process(logits[idx], mine), mine)
                except Exception:
                    log.exception("request %s failed while sampling", rows[idx[0]].seq.request_id)
            return out

    def _process(self, logits: torch.Tensor, rows: list[speculate.DecideRow]) -> torch.Tensor:
        """The rows' logits after their requests' logit_bias, penalties and grammars
        (logits_process.py); each row sees its output and the drafted tokens above its node."""
        paths = [r.drafted() if uses_processing(r.seq.params) else () for r in rows]
        return self.processor.process(logits, [r.seq for r in rows], paths)

    def _logprobs(self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int],
                  logit_rows: list[int] | None = None) -> list[TokenLogprob | None]:
        """Entry i's TokenLogprob where seqs[i] asked for log-probabilities (and was decided), else
        None; entry i's logits are row logit_rows[i] (default: row i). One copy to the host, if any."""
        out: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] >= 0]
        if rows:
            at = rows if logit_rows is None else [logit_rows[i] for i in rows]
            found = token_logprobs(logits[at], [tokens[i] for i in rows], [seqs[i].params.logprobs for i in rows])
            for i, lp in zip(rows, found):
                out[i] = lp
        return out

    def _clamp_budget(self, seq: Sequence, budget: int) -> int:
        """No deeper than the tokens the request may still emit or the cache can still hold."""
        room = self.max_model_len - self.cache.lengths[seq.slot] - 1
        left = seq.params.max_tokens - len(seq.output_ids) - 1
        return max(0, min(budget, room, left))

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob | None]) -> RequestDelta:
        """Append emitted tokens up to the first stop condition; detokenize; finish if stopped.
        `logprobs` has one entry per token (None where the request asked for none)."""
        if any(t < 0 for t in tokens):
            self._finish(seq, FinishReason.ERROR)
            return self._delta(seq, [], "", error="internal error while sampling")
        kept, reason = [], None
        p = seq.params
        for t in tokens:
            kept.append(t)
            seq.output_ids.append(t)
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids or self.grammars.advance(seq, t):
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= p.max_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        text = seq.detok.push(kept)
        if seq.detok.stopped:
            reason = FinishReason.STOP
        elif reason is not None:
            text += seq.detok.flush()
        if reason is not None:
            self._finish(seq, reason)
        delta = self._delta(seq, kept, text)
        if p.logprobs is not None:
            delta.logprobs = [lp for lp in logprobs[: len(kept)] if lp is not None]
        return delta

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark the sequence finished and give back what it held. Never raises: its caller still
        has to deliver the final delta."""
        if seq.finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.guard.release(seq)
        self.grammars.release(seq)
        forks, seq.forks, seq.shared_hidden = seq.forks, [], []
        for fork in forks:  # they waited for this one's prefill, which will not come: they end as it did
            self._finish(fork, reason)
            self._outbox.append(self._delta(fork, [], "", error="internal error" if reason is FinishReason.ERROR else None))
        self._seqs.pop(seq.request_id, None)
        try:
            self.scheduler.remove(seq)
            if seq.slot >= 0:
                slot, seq.slot = seq.slot, -1
                self.cache.free(slot)
        except Exception:
            log.exception("request %s: freeing its batch and cache slot failed", seq.request_id)

    def _fail(self, seq: Sequence, exc: BaseException) -> RequestDelta:
        """End the sequence with an error: its final delta."""
        if not seq.finished:
            self._finish(seq, FinishReason.ERROR)
        seq.finish_reason = FinishReason.ERROR
        return self._delta(seq, [], "", error=f"internal error: {type(exc).__name__}")

    def _delta(self, seq: Sequence, tokens: list[int], text: str, error: str | None = None) -> RequestDelta:
        return RequestDelta(
            request_id=seq.group_id,
            index=seq.index,
            token_ids=tokens,
            text=text,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            error=error,
        )
