"""How many prompt tokens a step may prefill while other sequences decode.

A prefill chunk shares its step with the decoding sequences (one packed forward), so every one of
them waits for the whole chunk before its next token: the chunk sets their inter-token latency
while a prompt arrives. vLLM bounds a step by a token count (`max_num_batched_tokens`); a count
right for one machine is wrong for another (a 256-token chunk costs ~8 decode steps on a CPU, where
every token is arithmetic, and little more than one on a GPU, where a decode step is bound by
reading the weights). So the budget here is in time, from what the steps measurably cost:

    decode + p * chunk <= ratio * decode   =>   chunk = (ratio - 1) * decode / p

with `decode` the seconds of a recent pure decode step of the same kind and `p` the seconds one
more prompt token adds to a step (the marginal cost, measured on mixed steps as their extra
seconds over the decode step per prompt token: a ratio of recent sums, so that large chunks,
whose extra time stands out of the noise, weigh more than small ones). The chunk is clamped to
[min_chunk, chunk]: the largest keeps the step's activations within what the cache plan
reserved; the smallest keeps a long prompt advancing where prompt tokens are dear.
With nothing decoding there is no one to wait, and a prompt gets the full chunk (the time to first
token of a lone request is unchanged).

A long prompt's steps are all mixed, so `decode` would stay what it was before the prompt came
while the machine's speed drifts (other processes; on a shared machine by a factor of two within
a minute), and a stale `decode` skews `p` too. So after `refresh_every` mixed steps in a row one
step prefills nothing: a pure decode step, measured, that counts half in its average.
"""

from __future__ import annotations

from collections.abc import Hashable

DecodeKind = Hashable  # what a step decodes, (sequences, tree budget, drafter tier): Scheduler.plan


class PrefillBudget:
    """Measures step costs and sizes the prefill chunk of steps that also decode.

    A decode step's cost is kept per kind of decode step (how many sequences, which tree budget and
    drafter tier: a step with 16-node trees costs more than a plain one, and a chunk is weighed
    against the step it joins); one not measured yet takes the latest measured kind's. Each is a
    moving average (the mean of the first 1 / `weight` samples, then exponential). A prompt token's
    cost is the ratio of two sums, extra seconds over the decode part and prompt tokens of the
    mixed steps, each decaying by (1 - `weight`) a step. A sample is clipped to `clip` times the
    current estimate so that a pause of the process does not shrink the chunks for many steps.
    Until a mixed step has been measured, `p` is seeded by steps that only prefill: seconds /
    tokens, an upper bound (it includes the step's fixed cost), so the first chunks err small."""

    def __init__(self, chunk: int, min_chunk: int, ratio: float | None, weight: float = 0.25, clip: float = 3.0,
                 refresh_every: int = 8):
        self.chunk, self.min_chunk, self.ratio = chunk, min(min_chunk, chunk), ratio
        self.weight, self.clip, self.refresh_every = weight, clip, refresh_every
        self.mixed_run = 0  # mixed steps since the last pure decode step
        self.decode_s: dict[DecodeKind, float] = {}  # seconds of a pure decode step, per kind
        self.decode_samples: dict[DecodeKind, int] = {}
        self.latest_decode_s: float | None = None  # the last kind measured: for a kind not seen yet
        self.token_s: float | None = None  # seconds a prompt token adds to a step
        self.extra_s = self.extra_tokens = 0.0  # decaying sums over mixed steps: token_s = extra_s / extra_tokens

    def decode_cost(self, kind: DecodeKind) -> float | None:
        return self.decode_s.get(kind, self.latest_decode_s)

    def size(self, decode: DecodeKind | None) -> int:
        """Prompt tokens the next step may prefill (all prefilling sequences together); `decode`:
        what the step also decodes (None: nothing)."""
        if decode is None or self.ratio is None:
            return self.chunk
        decode_s = self.decode_cost(decode)
        if decode_s is None or self.token_s is None:
            return self.min_chunk  # an unmeasured machine: small chunks until the costs are known
        if self.mixed_run >= self.refresh_every:
            return 0  # measure a decode step afresh (docstring)
        if self.token_s <= 0:
            return self.chunk
        return max(self.min_chunk, min(self.chunk, int((self.ratio - 1) * decode_s / self.token_s)))

    def record(self, prefill_tokens: int, decode: DecodeKind | None, seconds: float) -> None:
        """A step ran `prefill_tokens` prompt tokens and decoded `decode` (None: nothing) in `seconds`."""
        if seconds <= 0 or (not prefill_tokens and decode is None):
            return
        decode_s = None if decode is None else self.decode_cost(decode)
        refresh, self.mixed_run = self.mixed_run >= self.refresh_every, self.mixed_run + 1 if prefill_tokens else 0
        if not prefill_tokens:
            self._record_decode(decode, seconds, 0.5 if refresh else self.weight)
        elif decode is None:
            if not self.extra_tokens:  # only a seed: mixed steps measure the marginal cost itself
                seed = seconds / prefill_tokens
                self.token_s = seed if self.token_s is None else min(self.token_s, seed)
        elif decode_s is None:
            # A mixed step before any pure decode step (prompts arrived together): its decode part
            # is what its prompt tokens did not cost, by the (upper-bound) seed.
            if self.token_s is not None:
                self._record_decode(decode, max(0.0, seconds - self.token_s * prefill_tokens), self.weight)
        else:
            extra = max(0.0, seconds - decode_s)
            if self.token_s:
                extra = min(extra, self.clip * self.token_s * prefill_tokens)
            self.extra_s = (1 - self.weight) * self.extra_s + extra
            self.extra_tokens = (1 - self.weight) * self.extra_tokens + prefill_tokens
            self.token_s = self.extra_s / self.extra_tokens

    def _record_decode(self, kind: DecodeKind, seconds: float, weight: float) -> None:
        n = self.decode_samples[kind] = self.decode_samples.get(kind, 0) + 1
        mean = self.decode_s.get(kind)
        if mean is None:
            mean = seconds
        else:
            seconds = min(seconds, self.clip * mean) if mean > 0 else seconds
            mean += max(weight, 1.0 / n) * (seconds - mean)
        self.decode_s[kind] = self.latest_decode_s = mean
