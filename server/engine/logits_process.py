"""Logits processing: logit_bias, presence/frequency/repetition penalties and the grammar mask,
applied wherever the engine decides a token from logits.

Why it stays lossless under speculation. A processor is a function of (logits, the tokens the
request has emitted before the decided one). Plain decoding calls it with the output so far; the
speculative walk calls it at tree node i with the output so far (the root, the pending token, is
already in it) followed by the drafted tokens on the path below the root down to i. On the accepted
path those drafted tokens are exactly the tokens plain decoding would have emitted (accept.py,
point 1), so every decided node sees the processed logits plain decoding sees at that position,
and greedy or seeded Gumbel decisions (sampler.py) agree token for token.

Semantics (each a no-op at its default, and skipped entirely for rows that use none):
  logit_bias          l[v] += bias[v]                                  (OpenAI)
  repetition_penalty  for v in prompt or generated: l[v] / r if l[v] > 0 else l[v] * r   (vLLM/CTRL)
  frequency_penalty   l[v] -= f * count(v among generated tokens)      (OpenAI)
  presence_penalty    l[v] -= p * [count(v) > 0]                       (OpenAI)
  grammar             l[v] = -inf where the request's grammar forbids v at this point (grammar.py)
in that order (vLLM's: bias, then penalties; the mask last so nothing can revive a forbidden token).
Log-probabilities stay those of the raw logits (types.TokenLogprob), so speculation cannot change
them either.

Cost. Rows are (sequence, path tokens). Counts are built per row as the sequence's generated
tokens plus the row's path tokens, scattered into a dense (R, V) tensor in one call from host
lists (one host-to-device copy, no device-to-host sync). Rows whose request uses no processor are
not touched; a batch in which none does returns the logits unchanged without any tensor work.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from server.engine.grammar import Grammars
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams


def uses_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def uses_processing(p: SamplingParams) -> bool:
    """Does this request change its logits before deciding? (Cheap: called per row per step.)"""
    return bool(p.logit_bias) or uses_penalties(p) or p.grammar is not None


class LogitsProcessor:
    """Applies every request's logits processing; owns nothing but a reference to the grammars."""

    def __init__(self, grammars: Grammars):
        self.grammars = grammars

    def process(self, logits: torch.Tensor, seqs: Seq[Sequence], paths: Seq[Seq[int]]) -> torch.Tensor:
        """Processed logits (M, V) float32, or `logits` itself when no row needs processing.

        logits (M, V): row i is decided for seqs[i] after its output_ids followed by paths[i]
        (the drafted tokens between the tree root and the row's node; [] for plain decoding and
        for the first token after prefill).
        """
        if len(seqs) != logits.shape[0] or len(paths) != len(seqs):
            raise ValueError(f"{logits.shape[0]} rows but {len(seqs)} sequences and {len(paths)} paths")
        rows = [i for i, s in enumerate(seqs) if uses_processing(s.params)]
        if not rows:
            return logits
        out = logits.float().clone()  # (M, V): the caller's logits also feed log-probabilities
        biased = [i for i in rows if seqs[i].params.logit_bias]
        if biased:
            apply_logit_bias(out, biased, [seqs[i].params.logit_bias for i in biased])
        penalised = [i for i in rows if uses_penalties(seqs[i].params)]
        if penalised:
            apply_penalties(out, penalised, [seqs[i] for i in penalised], [paths[i] for i in penalised])
        constrained = [i for i in rows if seqs[i].params.grammar is not None]
        if constrained:
            allowed = self.grammars.allowed(
                [seqs[i] for i in constrained], [paths[i] for i in constrained], out.shape[1], out.device
            )  # (G, V) bool
            idx = torch.tensor(constrained, device=out.device)
            out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
        return out


def apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    """In place: logits[rows[j], v] += biases[j][v]. Ids outside the vocabulary are ignored (the API
    layer validates them against the tokenizer; a model may pad its vocabulary further)."""
    v = logits.shape[1]
    r, t, b = [], [], []
    for row, bias in zip(rows, biases):
        for tok, val in bias.items():
            if 0 <= tok < v:
                r.append(row)
                t.append(tok)
                b.append(val)
    if r:
        dev = logits.device
        logits.index_put_((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                          torch.tensor(b, dtype=logits.dtype, device=dev), accumulate=True)


def token_counts(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(R, V) float32: counts[r, v] = occurrences of v in histories[r] (one scatter from host lists)."""
    rows = [r for r, h in enumerate(histories) for _ in h]
    toks = [t for h in histories for t in h]
    counts = torch.zeros(len(histories), vocab, dtype=torch.float32, device=device)  # (R, V)
    if toks:
        counts.index_put_((torch.tensor(rows, device=device), torch.tensor(toks, device=device)),
                          torch.ones(len(toks), device=device), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list[Sequence], paths: Seq[Seq[int]]) -> None:
    """In place, on logits[rows]: repetition, then frequency and presence penalties (module
    docstring). Generated tokens = output_ids + path; the repetition penalty also counts the prompt."""
    dev, v = logits.device, logits.shape[1]
    generated = token_counts([s.output_ids + list(p) for s, p in zip(seqs, paths)], v, dev)  # (R, V)
    idx = torch.tensor(rows, device=dev)  # (R,)
    x = logits[idx]  # (R, V)
    if any(s.params.repetition_penalty != 1 for s in seqs):
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=torch.float32, device=dev)  # (R,)
        seen = (token_counts([s.prompt_ids for s in seqs], v, dev) + generated) > 0  # (R, V)
        r = rep[:, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], dtype=torch.float32, device=dev)  # (R,)
    pres = torch.tensor([s.params.presence_penalty for s in seqs], dtype=torch.float32, device=dev)  # (R,)
    x = x - freq[:, None] * generated - pres[:, None] * (generated > 0).float()
    logits[idx] = x
