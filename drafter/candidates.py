"""From CTC frame distributions to draft candidates: collapsed token sequences with scores.

The CTC draft module emits N frames per sequence, each a log-distribution over vocab + blank,
`log_probs` (N, V+1). Two ways to turn them into candidate token sequences:

- `static_tree_candidates`: the paper's way (as in Medusa). A static tree of *frame choices* picks,
  at frame t, the r-th most likely symbol for each rank path (r_0, r_1, ...); every path is
  CTC-collapsed, empty results are dropped, duplicates merged. score(path) = sum_t log p_t(x_t):
  the log-probability of that one alignment. A duplicate keeps its best alignment's score.
- `ctc_prefix_beam_search`: standard CTC prefix beam search (Graves 2012; Hannun et al. 2014).
  Each prefix l carries p_b(l) and p_nb(l), the probability of all alignments of the frames so far
  that collapse to l and end in a blank / in a non-blank, so a candidate's final score
  log(p_b + p_nb) sums over *all* of its alignments: log P(B(x) = l).

Both prune the vocabulary with `torch.topk` first, so the per-step cost is O(N V) for the top-k
plus small Python work on at most N * k symbols; nothing is quadratic in V.
`candidates_to_tree` merges the result into the `TokenTree` that the engine verifies.

Device and host halves. Each search is split where the data gets small: `static_tree_topk` and
`beam_search_inputs` run where the log-probs are (the accelerator), reduce (B, N, V+1) to a few
numbers per frame and pack them into one tensor; the drafter copies that to the host in one counted
transfer (server/runtime/host.py), and `static_tree_search` / `beam_search` do the search there.
The copy's size depends on N, k and the batch, never on V (a 128k vocabulary would otherwise cost
~49 MB per step at batch 16). Ids travel in the values' float dtype: exact below 2**24 in float32.
"""

from __future__ import annotations

import itertools
import math
from operator import itemgetter
from collections.abc import Sequence
from typing import NamedTuple

import torch

from drafter.collapse import ctc_collapse
from drafter.tree import TokenTree, build_trie

_first = itemgetter(0)
_EXACT_IDS_FLOAT32 = 1 << 24  # float32 represents every integer below this exactly


def _packing_dtype(log_probs: torch.Tensor) -> torch.dtype:
    """float32 (or float64 for float64 input, so that nothing is rounded); ids must stay exact."""
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    if dtype == torch.float32 and log_probs.shape[-1] > _EXACT_IDS_FLOAT32:
        raise ValueError(f"{log_probs.shape[-1]} symbols: ids above 2**24 are not exact in float32")
    return dtype


class Candidate(NamedTuple):
    """One collapsed draft sequence (no blanks, possibly of any length >= 1) and its log score."""

    tokens: list[int]
    score: float


# ----------------------------------------------------------------------------- static tree


def topk_paths(topk_per_frame: Sequence[int]) -> list[tuple[int, ...]]:
    """The root-to-leaf rank paths of a static tree with k_t children per node at frame t.

    E.g. [4, 3, 2, 2, 1, 1] gives 4*3*2*2 = 48 paths of length 6: (r_0, ..., r_5) with
    0 <= r_t < k_t. Only leaves are needed: collapse is online, so a shorter path's collapse is a
    prefix of a longer one's, and the trie holds every prefix anyway.
    """
    if any(k < 1 for k in topk_per_frame):
        raise ValueError(f"topk_per_frame entries must be >= 1, got {list(topk_per_frame)}")
    return list(itertools.product(*(range(k) for k in topk_per_frame)))


def _rank_paths(topk_per_frame: Sequence[int] | None, paths: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    if (topk_per_frame is None) == (paths is None):
        raise ValueError("give exactly one of topk_per_frame or paths")
    rank_paths = topk_paths(topk_per_frame) if paths is None else [tuple(p) for p in paths]
    if not rank_paths or any(len(p) == 0 or min(p) < 0 for p in rank_paths):
        raise ValueError("paths must be non-empty sequences of ranks >= 0")
    return rank_paths


def static_tree_topk(log_probs: torch.Tensor, depth: int, k: int) -> torch.Tensor:
    """Device half of the static tree: the top-k of the first `depth` frames, `log_probs` (B, N, V+1)
    -> (B, depth, 2k) packed [values | ids] (see the module docstring), for one copy to the host."""
    num_frames, num_symbols = log_probs.shape[1:]
    if depth > num_frames or k > num_symbols:
        raise ValueError(f"static tree needs {depth} frames and top-{k}, log_probs has {num_frames} x {num_symbols}")
    dtype = _packing_dtype(log_probs)
    top = log_probs[:, :depth].topk(k, dim=-1)  # (B, depth, k) each
    return torch.cat([top.values.to(dtype), top.indices.to(dtype)], dim=-1)


def static_tree_search(
    packed: torch.Tensor,
    blank: int,
    topk_per_frame: Sequence[int] | None = None,
    *,
    paths: Sequence[Sequence[int]] | None = None,
) -> list[list[Candidate]]:
    """Host half of the static tree: candidates per sequence from `static_tree_topk`'s (B, L, 2k)
    output, L = the rank paths' depth and k = their largest rank + 1 (`static_tree_shape`)."""
    rank_paths = _rank_paths(topk_per_frame, paths)
    batch, depth, two_k = packed.shape
    k = two_k // 2
    top_val, top_idx = packed[..., :k], packed[..., k:].long()  # (B, L, k) each
    ranks = torch.tensor([list(p) + [-1] * (depth - len(p)) for p in rank_paths], device=packed.device)  # (P, L)
    valid = ranks >= 0  # (P, L); a short path's missing frames count as blank with log-prob 0
    frame = torch.arange(depth, device=packed.device).expand_as(ranks)  # (P, L)
    sym = top_idx[:, frame, ranks.clamp(min=0)]  # (B, P, L)
    sym = torch.where(valid, sym, blank)  # (B, P, L)
    score = torch.where(valid, top_val[:, frame, ranks.clamp(min=0)].double(), 0.0).sum(-1)  # (B, P)

    num_paths = len(rank_paths)
    tokens, lengths = ctc_collapse(sym.reshape(batch * num_paths, depth), blank)  # (B*P, L), (B*P,)
    tokens_l = tokens.view(batch, num_paths, depth).tolist()
    lengths_l = lengths.view(batch, num_paths).tolist()
    score_l = score.tolist()
    out: list[list[Candidate]] = []
    for b in range(batch):
        best: dict[tuple[int, ...], float] = {}
        for row, n, s in zip(tokens_l[b], lengths_l[b], score_l[b]):
            if n == 0:
                continue
            key = tuple(row[:n])
            if key not in best or s > best[key]:
                best[key] = s
        ranked = sorted(best.items(), key=lambda kv: -kv[1])  # stable: ties keep first-seen order
        out.append([Candidate(list(seq), s) for seq, s in ranked])
    return out


def static_tree_shape(topk_per_frame: Sequence[int] | None = None, *,
                      paths: Sequence[Sequence[int]] | None = None) -> tuple[int, int]:
    """(depth, k) of a static tree: the frames and the top-k that `static_tree_topk` must keep."""
    rank_paths = _rank_paths(topk_per_frame, paths)
    return max(len(p) for p in rank_paths), max(max(p) for p in rank_paths) + 1


def batched_static_tree_candidates(
    log_probs: torch.Tensor,
    blank: int,
    topk_per_frame: Sequence[int] | None = None,
    *,
    paths: Sequence[Sequence[int]] | None = None,
) -> list[list[Candidate]]:
    """Static-tree candidates for each sequence of a batch, `log_probs` (B, N, V+1), both halves.

    Give exactly one of `topk_per_frame` (k_t children at frame t; see `topk_paths`) or `paths`
    (a Medusa-style list of rank paths, path[t] = rank of the symbol chosen at frame t; paths may
    differ in length, all <= N). Returns, per sequence, distinct non-empty collapsed sequences
    sorted by decreasing score (ties: first path first).
    """
    depth, k = static_tree_shape(topk_per_frame, paths=paths)
    packed = static_tree_topk(log_probs, depth, k)
    return static_tree_search(packed, blank, topk_per_frame, paths=paths)


def static_tree_candidates(
    log_probs: torch.Tensor,
    blank: int,
    topk_per_frame: Sequence[int] | None = None,
    *,
    paths: Sequence[Sequence[int]] | None = None,
) -> list[Candidate]:
    """`batched_static_tree_candidates` for one sequence, `log_probs` (N, V+1)."""
    return batched_static_tree_candidates(log_probs.unsqueeze(0), blank, topk_per_frame, paths=paths)[0]


# ----------------------------------------------------------------------------- prefix beam search


def _prefix_beam_search(
    probs: list[list[float]],
    column: dict[int, int],
    extensions: list[list[int]],
    blank: int,
    beam_width: int,
) -> list[Candidate]:
    """Prefix beam search on pre-gathered probabilities.

    probs[t][column[s]] = p_t(s) for every symbol s that can appear (blank and all extensions);
    extensions[t] = the non-blank symbols that may start a new token at frame t.
    Recursion, for prefix l with last token e and symbol c at frame t:
      p_b'(l)    += (p_b(l) + p_nb(l)) p_t(blank)
      p_nb'(l)   += p_nb(l) p_t(e)                       (repeat of e merges into it)
      p_nb'(l+c) += (p_b(l) + p_nb(l)) p_t(c)   if c != e
      p_nb'(l+c) += p_b(l) p_t(c)               if c == e (only a blank separates equal tokens)
    Plain float64 probabilities, not logs: over a handful of frames a product of probabilities stays
    far above the smallest double unless it is astronomically unlikely (then it drops out as 0),
    and additions instead of log-add-exps make this several times faster.
    """
    blank_col = column[blank]
    beam: dict[tuple[int, ...], tuple[float, float]] = {(): (1.0, 0.0)}  # prefix -> (p_b, p_nb)
    for row, ext in zip(probs, extensions):
        nxt: dict[tuple[int, ...], list[float]] = {}
        get = nxt.get
        p_blank = row[blank_col]
        grows = [(c, row[column[c]]) for c in ext]  # (symbol, p_t(symbol)), read once per frame
        for prefix, (pb, pnb) in beam.items():
            total = pb + pnb
            entry = get(prefix)
            if entry is None:
                entry = nxt[prefix] = [0.0, 0.0]
            entry[0] += total * p_blank
            last = prefix[-1] if prefix else None
            if last is not None:
                entry[1] += pnb * row[column[last]]
            for c, p in grows:
                key = prefix + (c,)
                grown = get(key)
                if grown is None:
                    nxt[key] = [0.0, (pb if c == last else total) * p]  # (0.0 + x is x: the same sums)
                else:
                    grown[1] += (pb if c == last else total) * p
        # Impossible prefixes (e.g. "a a" after 2 frames) have probability 0 and are dropped.
        alive = [(pb + pnb, prefix) for prefix, (pb, pnb) in nxt.items() if pb + pnb > 0.0]
        if len(alive) > beam_width:  # the best beam_width, ties in insertion order (a stable sort)
            alive.sort(key=_first, reverse=True)
            del alive[beam_width:]
        beam = {prefix: tuple(nxt[prefix]) for _, prefix in alive}
    final = [Candidate(list(prefix), math.log(pb + pnb)) for prefix, (pb, pnb) in beam.items() if prefix]
    final.sort(key=lambda c: -c.score)
    return final


def beam_search_inputs(log_probs: torch.Tensor, blank: int, prune_topk: int | None) -> torch.Tensor:
    """Device half of the prefix beam search, `log_probs` (B, N, V+1) -> (B, N, k + U) packed.

    Per frame: [the ids of its top k symbols (k = prune_topk, all V+1 symbols if None) | the
    frame's log-probs at U = N k + 1 columns: every frame's top-k ids, then the blank]. A prefix
    only ever holds symbols from some frame's top-k, so these are all the probabilities the search
    reads (an id in several frames' top-k has several columns with equal values).
    """
    if prune_topk is not None and prune_topk < 1:
        raise ValueError(f"prune_topk must be >= 1 or None, got {prune_topk}")
    batch, num_frames, num_symbols = log_probs.shape
    dtype = _packing_dtype(log_probs)
    k = num_symbols if prune_topk is None else min(prune_topk, num_symbols)
    if k < num_symbols:
        top_idx = log_probs.topk(k, dim=-1).indices  # (B, N, k)
    else:
        top_idx = torch.arange(num_symbols, device=log_probs.device).expand(batch, num_frames, k)  # (B, N, V+1)
    blank_col = torch.full((batch, 1), blank, dtype=top_idx.dtype, device=log_probs.device)
    columns = torch.cat([top_idx.flatten(1), blank_col], dim=1)  # (B, U)
    gathered = log_probs.gather(2, columns[:, None, :].expand(batch, num_frames, -1))  # (B, N, U)
    return torch.cat([top_idx.to(dtype), gathered.to(dtype)], dim=-1)


def beam_search(packed: torch.Tensor, blank: int, beam_width: int) -> list[list[Candidate]]:
    """Host half of the prefix beam search: candidates per sequence from `beam_search_inputs`'
    (B, N, k + N k + 1) output."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    batch, num_frames, width = packed.shape
    k = (width - 1) // (num_frames + 1)
    top_l = packed[..., :k].long().tolist()  # (B, N, k) ids
    probs_l = packed[..., k:].double().exp().tolist()  # (B, N, U)
    out: list[list[Candidate]] = []
    for b in range(batch):
        columns = [s for frame in top_l[b] for s in frame] + [blank]  # (U,) as beam_search_inputs laid out
        column = {s: j for j, s in enumerate(columns)}
        extensions = [[s for s in frame if s != blank] for frame in top_l[b]]
        out.append(_prefix_beam_search(probs_l[b], column, extensions, blank, beam_width))
    return out


def batched_prefix_beam_search(
    log_probs: torch.Tensor, blank: int, beam_width: int, prune_topk: int | None = None
) -> list[list[Candidate]]:
    """CTC prefix beam search for each sequence of a batch, `log_probs` (B, N, V+1), both halves.

    At frame t only the `prune_topk` most likely symbols may extend a prefix (None: all symbols;
    blank and a prefix's own last token always keep their exact probabilities, since every token of
    a prefix came from some frame's top-k, whose log-probs are gathered for all frames). Returns,
    per sequence, up to `beam_width` non-empty collapsed sequences sorted by decreasing
    log P(B(x) = tokens). Without pruning and with a beam as wide as the number of prefixes, the
    scores are exact.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    return beam_search(beam_search_inputs(log_probs, blank, prune_topk), blank, beam_width)


def ctc_prefix_beam_search(
    log_probs: torch.Tensor, blank: int, beam_width: int, prune_topk: int | None = None
) -> list[Candidate]:
    """`batched_prefix_beam_search` for one sequence, `log_probs` (N, V+1)."""
    return batched_prefix_beam_search(log_probs.unsqueeze(0), blank, beam_width, prune_topk)[0]


# ----------------------------------------------------------------------------- to a tree


def candidates_to_tree(root_token: int, candidates: Sequence[Candidate], max_nodes: int,
                       merge: str = "max") -> TokenTree:
    """Merge scored candidates into the verification trie under the pending token `root_token`,
    keeping at most `max_nodes` draft nodes, the most valuable first (see `build_trie`: `merge`
    says how the scores of the candidates through a node make its value)."""
    return build_trie(root_token, [c.tokens for c in candidates], [c.score for c in candidates], max_nodes, merge)
