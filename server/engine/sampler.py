"""Sampling with per-position noise: the token for output position t is a function of
(logits, sampling params, request seed, t) and of nothing else.

Math. For one row with logits l (V,), temperature T > 0 and top-k/top-p filters:
  1. filter: l' = l with -inf outside the kept set K (`process_logits`), so that
     softmax(l' / T) = p restricted to K and renormalised, where p = softmax(l / T);
  2. noise:  g_t (V,) i.i.d. standard Gumbel, g = -log(-log u), u ~ U(0, 1), drawn from a
     torch.Generator seeded by hash(seed, t) (`position_noise`);
  3. decide: x_t = argmax_v (l'_v / T + g_t[v]).
Gumbel-max trick: P(argmax_v (a_v + g_v) = w) = exp(a_w) / sum_v exp(a_v) for i.i.d. Gumbel g,
so x_t is an exact sample from softmax(l' / T). T == 0 means greedy: x_t = argmax_v l_v, no noise
and no filtering (the filters always keep the top token, so they cannot change the argmax).

Why noise per (seed, position) instead of one generator per request: the token decided at a tree
node depends only on the node's logits and its output position, never on how many nodes were
drafted, which siblings exist or which other requests share the batch. So speculative decoding
emits token-for-token what plain sampling emits with the same seed (see accept.py for the proof
and for why this equals recursive rejection sampling over sibling drafts), and a seeded request is
reproducible whatever the tree shape, drafter or batch composition. Siblings share a depth and so
share g_t; that is harmless because at most one node per depth is ever on the accepted path.

Device choice: the noise is drawn by a generator *on the logits' device*. Drawing on the CPU and
copying would make tokens identical across CPU and CUDA, but costs ~125 us of CPU time per 32k
vocab vector (measured on the project's 2-core dev machine) plus a host-to-device copy: ~50 ms
per step at batch 64 with 6-deep trees (7 positions per sequence), the order of a whole verify
forward. CUDA's Philox generator is counter based, so seeding one per (seed, position) and
drawing V numbers is one small kernel launch. The price: for the same seed, CPU and CUDA runs
give different (each correct and reproducible) samples, as in other servers. Nothing is cached
between calls: generators are created, seeded, used and dropped. The Gumbel transform runs once
on the stacked draws; it is elementwise, so a row's noise does not depend on what it is stacked
with (the tests check this bitwise on CPU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from server.engine.types import SamplingParams, TokenLogprob
from server.runtime.host import host_list, to_device

IntsLike = Sequence[int] | torch.Tensor


def process_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    filtering: bool | None = None,
) -> torch.Tensor:
    """Top-k then top-p filtering, per row. Returns float32 (M, V) logits, -inf outside the kept set.

    Args (all on the logits' device or CPU; one entry per row):
      logits (M, V) any float dtype; temperature (M,) >= 0; top_k (M,) int, 0 = off;
      top_p (M,) in (0, 1], 1 = off.
    Tokens are ranked by logit, ties broken by lower token id (a stable sort), so the result is
    deterministic. Top-k keeps the first k ranks. Top-p then works on q = softmax(l / T) restricted
    to the top-k set and renormalised (the convention of HF transformers and vLLM): it keeps rank r
    iff the mass of the ranks before r is < top_p, i.e. the smallest prefix of the ranking whose mass
    is >= top_p, which always includes rank 0. (Masses within float32 rounding of top_p can go either
    way.) Rows with temperature 0 (greedy) are returned unfiltered. The output logits are *not*
    divided by the temperature.
    `filtering`: whether any row has a filter on, if the caller knows it from the parameters; None
    finds out on the device, at the price of one copy to the host (a synchronisation).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (M, V), got shape {tuple(logits.shape)}")
    m, v = logits.shape
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if t.shape != (m,):
            raise ValueError(f"{name} must be ({m},), got shape {tuple(t.shape)}")
    x = logits.float()  # (M, V)
    dev = x.device
    temperature = temperature.to(dev, torch.float32)
    top_k = top_k.to(dev, torch.long)
    top_p = top_p.to(dev, torch.float32)
    sampled = temperature > 0  # (M,) greedy rows skip the filters
    k_on = sampled & (top_k > 0) & (top_k < v)
    p_on = sampled & (top_p < 1)
    if filtering is None:
        filtering = host_list((k_on | p_on).any())
    if not filtering:  # common case: nothing to filter, skip the sort
        return x

    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (M, V) each
    ranks = torch.arange(v, device=dev)  # (V,)
    k = torch.where(k_on, top_k, v)  # (M,)
    keep_sorted = ranks[None, :] < k[:, None]  # (M, V) top-k in rank order

    scale = torch.where(sampled, temperature, torch.ones_like(temperature))  # (M,) avoid /0
    scaled = (sorted_x / scale[:, None]).masked_fill(~keep_sorted, float("-inf"))  # (M, V)
    probs = torch.softmax(scaled, dim=-1)  # (M, V) renormalised over the top-k set
    cum = torch.cumsum(probs, dim=-1)  # (M, V)
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # (M, V) exclusive; 0 at rank 0
    keep_p = (mass_before < top_p[:, None]) | ~p_on[:, None]  # (M, V) rank 0 always kept (0 < top_p)
    keep_sorted &= keep_p

    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # (M, V) back to token order
    return x.masked_fill(~keep, float("-inf"))


def noise_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed for (request seed, output position).

    A hash rather than e.g. seed + position, so that neighbouring seeds do not share noise at
    shifted positions (seed s at t + 1 must not equal seed s + 1 at t).
    """
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def position_uniform(seed: int, position: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """U[0, 1) draws (V,) float32 for (seed, position), from a fresh torch.Generator on `device`
    seeded by `noise_seed(seed, position)`."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed(seed, position))
    return torch.rand(vocab, generator=gen, device=device, dtype=torch.float32)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms: g = -log(-log u), elementwise, any shape.

    u is clamped to [tiny, 1) so g is always finite (g in [-4.5, 16.7]); the clamp changes u only
    when it is exactly 0, an event of probability 2^-24 per draw.
    """
    u = u.clamp(min=torch.finfo(u.dtype).tiny)
    return -torch.log(-torch.log(u))


def position_noise(seed: int, position: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise g_t (V,) float32 for (seed, position t), drawn on `device`."""
    return gumbel(position_uniform(seed, position, vocab, device))


def batch_noise(
    seeds: Sequence[int], positions: Sequence[int], vocab: int, device: torch.device | str
) -> torch.Tensor:
    """Gumbel noise (S, V): row r = position_noise(seeds[r], positions[r]).

    Each distinct (seed, position) pair is drawn once: all nodes of one tree at the same depth
    share a position, so a tree of n nodes and depth d costs d + 1 draws, not n + 1. The Gumbel
    transform then runs once over the stacked draws.
    """
    slot: dict[tuple[int, int], int] = {}
    index = [slot.setdefault((s, t), len(slot)) for s, t in zip(seeds, positions)]  # (S,)
    unique = torch.stack([position_uniform(s, t, vocab, device) for s, t in slot])  # (U, V)
    return gumbel(unique)[to_device(index, unique.device)]


def _as_list(x: IntsLike) -> list[int]:
    return [int(v) for v in (host_list(x) if isinstance(x, torch.Tensor) else x)]


def decide_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int | None] | torch.Tensor,
    positions: IntsLike,
) -> torch.Tensor:
    """Decide one token per row: (M,) int64 on the logits' device.

    logits (M, V): base-model next-token logits; params[i], seeds[i], positions[i]: row i's sampling
    params, request seed and output position (t = number of tokens the request has emitted before
    this one). Greedy rows (temperature 0): argmax of the raw logits, seed ignored (may be None).
    Sampled rows: argmax(process_logits(l) / T + position_noise(seed, t)), vectorised over rows,
    a sample from softmax of the filtered logits / T. Rows may freely mix greedy and sampled.
    The engine gives unseeded requests a random seed once, at admission.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (M, V), got shape {tuple(logits.shape)}")
    m, v = logits.shape
    seed_list = host_list(seeds) if isinstance(seeds, torch.Tensor) else list(seeds)
    pos_list = _as_list(positions)
    if not len(params) == len(seed_list) == len(pos_list) == m:
        raise ValueError(f"{m} logits rows but {len(params)} params, {len(seed_list)} seeds, {len(pos_list)} positions")

    tokens = logits.argmax(dim=-1)  # (M,) greedy for every row; sampled rows are overwritten below
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    if any(seed_list[i] is None for i in rows):
        raise ValueError("sampled rows need an integer seed")

    dev = logits.device
    idx = to_device(rows, dev)  # (S,) without a stream sync on CUDA (host.to_device), as below
    temperature = to_device([params[i].temperature for i in rows], dev, torch.float32)  # (S,)
    # top_k >= V keeps every token; clamping first keeps a huge top_k from overflowing int64.
    top_k = to_device([min(params[i].top_k or 0, v) for i in rows], dev)  # (S,)
    top_p = to_device([params[i].top_p for i in rows], dev, torch.float32)  # (S,)
    # Known from the parameters, so deciding needs no copy to the host (a step stays on the device).
    filtering = any(0 < min(params[i].top_k or 0, v) < v or params[i].top_p < 1 for i in rows)
    filtered = process_logits(logits[idx], temperature, top_k, top_p, filtering)  # (S, V)
    noise = batch_noise([int(seed_list[i]) for i in rows], [pos_list[i] for i in rows], v, dev)  # (S, V)
    tokens[idx] = (filtered / temperature[:, None] + noise).argmax(dim=-1)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] and its top[i] likeliest tokens, best first.

    logits (M, V): raw next-token logits. The distribution is log_softmax of the raw logits, before
    temperature and filtering (the model's own, as vLLM reports by default). One log_softmax and
    one topk for all rows, and one copy to the host: the chosen log-probs, the top values and the
    top ids travel as one float64 tensor (ids below 2**53 are exact in float64).
    """
    if logits.dim() != 2 or not logits.shape[0] == len(tokens) == len(top):
        raise ValueError(f"logits {tuple(logits.shape)} need one row per token ({len(tokens)}) and top ({len(top)})")
    if not len(tokens):
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    chosen = logp.gather(1, torch.tensor(list(tokens), device=logp.device)[:, None])  # (M, 1)
    best = logp.topk(max(top), dim=-1)  # (M, k); k may be 0
    k = best.values.shape[1]
    rows = host_list(torch.cat([chosen, best.values, best.indices.to(chosen.dtype)], dim=1).double())  # (M, 1 + 2k)
    return [
        TokenLogprob(int(t), row[0], [(int(i), lp) for i, lp in zip(row[1 + k : 1 + k + n], row[1 : 1 + n])])
        for t, n, row in zip(tokens, top, rows)
    ]
