"""How many prompt tokens a step may prefill while other sequences decode.

A prefill chunk shares its step with the decoding sequences (one packed forward), so every one of
them waits for the whole chunk before its next token: the chunk sets their inter-token latency
while a prompt arrives. vLLM bounds a step by a token count (`max_num_batched_tokens`); a count
right for one machine is wrong for another (a 256-token chunk costs ~8 decode steps on a CPU, where
every token is arithmetic, and little more than one on a GPU, where a decode step is bound by
reading the weights). So the budget here is in time, from what the steps measurably cost:

    decode + p * chunk <= ratio * decode   =>   chunk = (ratio - 1) * decode / p

with `decode` the seconds of a recent pure decode step and `p` the seconds one more prompt token
adds to a step (the marginal cost: measured on mixed steps as (seconds - decode) / chunk). The
chunk is clamped to [min_chunk, chunk]: the largest keeps the step's activations within what the
cache plan reserved; the smallest keeps a long prompt advancing where prompt tokens are dear.
With nothing decoding there is no one to wait, and a prompt gets the full chunk (the time to first
token of a lone request is unchanged).
"""

from __future__ import annotations


class PrefillBudget:
    """Measures step costs and sizes the prefill chunk of steps that also decode.

    Both costs are moving averages (the mean of the first 1 / `weight` samples, then exponential),
    each sample clipped to `clip` times the current mean so that a pause of the process does not
    shrink the chunks for many steps. Until a mixed step has been measured, `p` is seeded by steps
    that only prefill: seconds / tokens, an upper bound (it includes the step's fixed cost), so the
    first chunks err on the small side."""

    def __init__(self, chunk: int, min_chunk: int, ratio: float | None, weight: float = 0.25, clip: float = 3.0):
        self.chunk, self.min_chunk, self.ratio = chunk, min(min_chunk, chunk), ratio
        self.weight, self.clip = weight, clip
        self.decode_s: float | None = None  # seconds of a pure decode step
        self.token_s: float | None = None  # seconds a prompt token adds to a step
        self.samples = {"decode": 0, "token": 0}  # samples in each average (0 for a seeded `token_s`)

    def size(self, decoding: bool) -> int:
        """Prompt tokens the next step may prefill (all prefilling sequences together); `decoding`:
        the step also decodes some sequences."""
        if not decoding or self.ratio is None:
            return self.chunk
        if self.decode_s is None or self.token_s is None:
            return self.min_chunk  # an unmeasured machine: small chunks until the costs are known
        if self.token_s <= 0:
            return self.chunk
        return max(self.min_chunk, min(self.chunk, int((self.ratio - 1) * self.decode_s / self.token_s)))

    def record(self, prefill_tokens: int, decoding: bool, seconds: float) -> None:
        """A step ran `prefill_tokens` prompt tokens (and decoded some sequences if `decoding`) in
        `seconds`."""
        if seconds <= 0 or (not prefill_tokens and not decoding):
            return
        if not prefill_tokens:
            self.decode_s = self._update("decode", self.decode_s, seconds)
        elif not decoding:
            if not self.samples["token"]:  # only a seed: mixed steps measure the marginal cost itself
                seed = seconds / prefill_tokens
                self.token_s = seed if self.token_s is None else min(self.token_s, seed)
        elif self.decode_s is None:
            # A mixed step before any pure decode step (prompts arrived together): its decode part
            # is what its prompt tokens did not cost, by the (upper-bound) seed.
            if self.token_s is not None:
                self.decode_s = self._update("decode", None, max(0.0, seconds - self.token_s * prefill_tokens))
        else:
            self.token_s = self._update("token", self.token_s, max(0.0, seconds - self.decode_s) / prefill_tokens)

    def _update(self, name: str, mean: float | None, value: float) -> float:
        n = self.samples[name] = self.samples[name] + 1
        if mean is None or n == 1:
            return value
        if mean > 0:
            value = min(value, self.clip * mean)
        return mean + max(self.weight, 1.0 / n) * (value - mean)
