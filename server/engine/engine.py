"""LLMEngine: the synchronous engine core one worker thread drives (see types.EngineCore).

`step()` = schedule -> propose -> one batched verify forward (prefill chunks + trees) -> decide
and accept per sequence -> commit KV -> stop checks and incremental detokenization -> deltas.
A failure in the batched part fails the requests of that step (each gets an ERROR delta and its
slot back) and leaves the engine serving; a failure while finishing one sequence fails only it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from drafter.base import Drafter
from server.engine import speculate
from server.engine.accept import check_tree
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.scheduler import DraftOutcome, Plan, Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, Status
from server.engine.sampler import token_logprobs
from server.engine.types import EngineError, EngineStats, FinishReason, RequestDelta, SamplingParams, TokenLogprob
from server.runtime.batch import ForwardItem
from server.runtime.model import CausalLM

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_model_len: int = 2048
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")


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
        self.model_name = model_name
        self.max_model_len = config.max_model_len
        self.cache = model.make_cache(config.scheduler.max_batch_size, config.max_model_len)
        self.scheduler = Scheduler(config.scheduler, tiers=len(drafter.tiers) if drafter is not None else 1)
        self.eos_ids = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._seqs: dict[str, Sequence] = {}
        self._outbox: list[RequestDelta] = []  # deltas produced outside step() (aborts)
        # Wall seconds spent per phase since start (propose / verify / finish): where a step's time goes.
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
        seq = Sequence(request_id, list(prompt_token_ids), params, IncrementalDetokenizer(self.tokenizer, params.stop))
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.ABORT)
            self._outbox.append(self._delta(seq, [], ""))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._outbox)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.cache.usage(),
        )

    def step(self) -> list[RequestDelta]:
        deltas, self._outbox = self._outbox, []
        for seq in self.scheduler.admit(self.cache.can_allocate, self.cache.allocate):
            if self.drafter is not None:
                self.drafter.start(seq.request_id, seq.prompt_ids)
        plan = self.scheduler.plan(speculation_enabled=self.drafter is not None)
        if plan.empty:
            return deltas
        try:
            deltas += self._run(plan)
        except Exception as exc:  # the batch failed as a whole: fail its requests, keep serving
            log.exception("engine step failed; failing the %d requests in it", len(plan.prefill) + len(plan.decode))
            for seq, _ in plan.prefill + plan.decode:
                if not seq.finished:
                    self._finish(seq, FinishReason.ERROR)
                    deltas.append(self._delta(seq, [], "", error=f"internal error: {type(exc).__name__}"))
        return deltas

    # -- the step --------------------------------------------------------------------------------
    def _run(self, plan: Plan) -> list[RequestDelta]:
        t0 = time.perf_counter()
        decode = [(seq, self._clamp_budget(seq, b)) for seq, b in plan.decode]
        trees = speculate.propose(self.drafter, decode, plan.tier)
        t1 = time.perf_counter()
        items, positions = [], []
        for seq, n in plan.prefill:
            chunk = seq.prompt_ids[seq.num_prefilled : seq.num_prefilled + n]
            items.append(ForwardItem(seq.slot, self.cache.lengths[seq.slot], chunk))
            last = seq.num_prefilled + n == len(seq.prompt_ids)
            positions.append([n - 1] if last else [])
        for (seq, _), tree in zip(decode, trees):
            items.append(ForwardItem(seq.slot, self.cache.lengths[seq.slot], tree.tokens, tree.parents))
            positions.append([])  # its logits: speculate.accept computes them where its walk goes
        out = speculate.verify(self.model, self.cache, items, positions)
        t2 = time.perf_counter()

        # the first token of every prefill that completed: one batched call
        completed = [seq for (seq, _), pos in zip(plan.prefill, positions) if pos]
        decided = self._decide(out.logits, completed, [0] * len(out.logits))
        first_logprobs = self._logprobs(out.logits, completed, decided)

        deltas: list[RequestDelta] = []
        needs_hidden = self.drafter is not None and self.drafter.needs_hidden
        for b, (seq, n) in enumerate(plan.prefill):
            chunk = items[b].tokens
            self.cache.advance(seq.slot, n)
            seq.num_prefilled += n
            if self.drafter is not None:
                self.drafter.observe(seq.request_id, chunk, out.item_hidden(b) if needs_hidden else None)
            if positions[b]:
                seq.status = Status.DECODE
                row = out.rows[b][0]
                deltas.append(self._emit(seq, [decided[row]], [first_logprobs[row]]))
        base, index = len(plan.prefill), []
        for j, ((seq, _), tree) in enumerate(zip(decode, trees)):
            try:
                check_tree(tree.tokens, tree.parents)
                index.append(j)
            except Exception as exc:
                log.exception("request %s failed in acceptance", seq.request_id)
                self._finish(seq, FinishReason.ERROR)
                deltas.append(self._delta(seq, [], "", error=f"internal error: {type(exc).__name__}"))
        committed = [decode[j][0] for j in index]
        walk_logprobs: list[list[TokenLogprob | None]] = [[] for _ in committed]  # per walk, per emitted token

        def decide(logits: torch.Tensor, nodes: list[tuple[int, int]]) -> list[int]:
            seqs = [committed[k] for k, _ in nodes]
            depths = [trees[index[k]].depths[node] for k, node in nodes]
            tokens = self._decide(logits, seqs, [len(s.output_ids) + d for s, d in zip(seqs, depths)])
            for (k, _), lp in zip(nodes, self._logprobs(logits, seqs, tokens)):
                walk_logprobs[k].append(lp)  # each node a walk stands on emits its decided token
            return tokens

        results = speculate.accept(self.model, out.packed_hidden, [out.offsets[base + j] for j in index],
                                   [trees[j] for j in index], decide)
        speculate.commit(self.cache, committed, results)
        outcomes = []
        for seq, res, j, logprobs in zip(committed, results, index, walk_logprobs):
            tree = trees[j]
            if self.drafter is not None:
                h = out.item_hidden(base + j)[res.path] if needs_hidden else None
                self.drafter.observe(seq.request_id, [tree.tokens[i] for i in res.path], h)
            delta = self._emit(seq, res.emitted, logprobs)
            if decode[j][1] > 0:  # asked for a draft, even if the drafter found none
                outcomes.append(DraftOutcome(decode[j][1], tree.num_draft_tokens, res.path[1:]))
            if tree.num_nodes > 1:
                delta.speculated = True
                delta.num_draft_tokens = tree.num_nodes - 1
                delta.num_accepted_tokens = res.num_accepted
            deltas.append(delta)
        t3 = time.perf_counter()
        self.phase_seconds.update(propose=t1 - t0, verify=t2 - t1, finish=t3 - t2)
        if not plan.prefill and decode:  # a pure decode step: what the governor compares
            self.scheduler.governor.record(len(decode), plan.budget, t3 - t0, outcomes, plan.cap, plan.sampled,
                                           plan.tier)
        return deltas

    def _decide(self, logits: torch.Tensor, seqs: list[Sequence], positions: list[int]) -> list[int]:
        if not seqs:
            return []
        try:
            return speculate.decide(logits, seqs, positions)
        except Exception:
            # Isolate the failing request(s): decide row by row; a failing row gets -1 and its
            # sequence fails in acceptance (a token of -1 never matches and is refused by _emit).
            out = []
            for i, seq in enumerate(seqs):
                try:
                    out += speculate.decide(logits[i : i + 1], [seq], positions[i : i + 1])
                except Exception:
                    log.exception("request %s failed while sampling", seq.request_id)
                    out.append(-1)
            return out

    def _logprobs(self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
        """Row i's TokenLogprob where seqs[i] asked for log-probabilities (and was decided), else None."""
        out: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] >= 0]
        if rows:
            found = token_logprobs(logits[rows], [tokens[i] for i in rows], [seqs[i].params.logprobs for i in rows])
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
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
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
        if seq.finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.remove(seq)
        if seq.slot >= 0:
            self.cache.free(seq.slot)
            seq.slot = -1
        if self.drafter is not None:
            self.drafter.release(seq.request_id)
        self._seqs.pop(seq.request_id, None)

    def _delta(self, seq: Sequence, tokens: list[int], text: str, error: str | None = None) -> RequestDelta:
        return RequestDelta(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            error=error,
        )
