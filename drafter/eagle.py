"""EAGLE-style drafter: autoregression over the base model's features (Li et al., EAGLE, arXiv
2401.15077; EAGLE-2's dynamic tree, arXiv 2406.16858), with the CTC-drafter authors' optional
auxiliary CTC loss.

Architecture. Position t carries c_t = W [f_t ; E(x_{t+1})]: a feature f_t fused with the embedding
of the token after t. For committed positions f_t is the base model's final-norm hidden state h_t
(what its LM head reads). One decoder layer (the runtime's own) runs over the c's causally; its
output g_t is trained to BE the next feature, g_t ~ h_{t+1}, so that the frozen base LM head on g_t
predicts the token after x_{t+1}. Drafting continues on the drafter's own features: a drafted
token d gets c = W [g_parent ; E(d)], its output g predicts the token after d, and so on, which
grows a tree one depth per forward.

Trees. "static" (EAGLE-1): every node at depth d gets the top `static_topk[d]` tokens as children.
"dynamic" (EAGLE-2): at each depth only the `dynamic_topk` children of highest path probability
(product of the drafter's probabilities from the root) are expanded further; every node drafted is
a candidate scored by its path log-probability, and the engine's node budget keeps the best,
which is EAGLE-2's re-ranking. The root is the last committed position, whose next token is the
pending token: its output drafts depth 1.

Training (`EagleObjective`): EAGLE-1's loss at every context position, smooth-L1 of g_t against
h_{t+1} plus 0.1 x cross-entropy of the LM head on g_t against the base model's greedy token; then,
from sampled anchors, the drafter is unrolled `num_frames - 1` more steps on its OWN features (tokens
teacher-forced to the base model's greedy ones), with cross-entropy at every drafted position, so it
learns to draft from the features it will really see. `ctc_weight` > 0 adds the CTC-drafter
authors' auxiliary loss: the anchor's drafted positions are read as CTC frames over vocab + blank
(the blank is one extra output, `blank_head`) and aligned to the next `num_labels` base tokens.
N = num_labels + 1 frames leave CTC one frame of slack (a blank or a repeat). The blank is a
training signal only: at inference a node needs a token to feed the next depth and the trie holds
real tokens only, so drafts are read from the vocabulary part of each distribution.

Its own KV cache, as the CTC drafter's: committed positions are computed once; each step runs the
new committed positions, then one forward per depth over the tree drafted so far (tree attention
over the cache), whose K/V are never kept. The last committed position is recomputed every step
as the tree's root, so its K/V sit where the next step will overwrite them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from drafter.base import ProposeRequest
from drafter.candidates import Candidate
from drafter.collapse import collapse_sequence
from drafter.decoder import CachedContextDrafter, DecoderOverBase, DraftLayersConfig
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.host import to_host
from server.runtime.model import DecoderLayer, RMSNorm

# EAGLE-1's weight of the token cross-entropy against the feature regression.
CLS_WEIGHT = 0.1


@dataclass
class EagleConfig(DraftLayersConfig):
    base_architecture: str
    base_hidden_size: int
    base_vocab_size: int
    num_labels: int = 4  # K: base tokens each training anchor drafts
    num_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tree: str = "dynamic"  # "dynamic": EAGLE-2's top-k expansion; "static": EAGLE-1's fixed shape
    depth: int = 5  # tree depth at inference
    dynamic_topk: int = 4  # nodes expanded per depth, children per node
    # A tree stops growing once its likeliest new node's path probability is below this (0: never):
    # a deeper node is less likely still, so its depth would cost a forward for nothing.
    min_path_prob: float = 0.0
    static_topk: list[int] = field(default_factory=lambda: [4, 2, 2, 1, 1])  # children per node at each depth
    kind: str = "eagle"

    def __post_init__(self) -> None:
        if self.tree not in ("static", "dynamic"):
            raise ValueError(f"tree must be 'static' or 'dynamic', got {self.tree!r}")
        if self.depth < 1 or self.dynamic_topk < 1 or min(self.static_topk, default=0) < 1:
            raise ValueError("depth, dynamic_topk and static_topk entries must be >= 1")
        if not 0.0 <= self.min_path_prob < 1.0:
            raise ValueError(f"min_path_prob must be in [0, 1), got {self.min_path_prob}")
        self.static_topk = (list(self.static_topk) + [1] * self.depth)[: self.depth]

    @property
    def num_frames(self) -> int:
        """Drafted positions per training anchor: K + 1, one frame of CTC slack."""
        return self.num_labels + 1


class EagleDraftModel(DecoderOverBase):
    """Trainable part: fuse, decoder layers, output norm, blank head. The base embedding and LM
    head are borrowed (frozen, not saved): `attach_base` sets them."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.config = cfg
        H, lc = cfg.base_hidden_size, cfg.layer_config()
        self.fuse = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(lc, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)  # the target features are final-norm outputs
        self.blank_head = nn.Linear(H, 1)  # trained by the CTC term only
        self.init_rope()

    def token_logits(self, g: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) float32: the base LM head on drafted features."""
        _, lm_head = self.base
        return lm_head(g).float()

    def frame_log_probs(self, g: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V + 1) float32 log-probabilities with the blank last (for CTC)."""
        return torch.log_softmax(torch.cat([self.token_logits(g), self.blank_head(g).float()], -1), -1)


# ----------------------------------------------------------------------------- training


class EagleObjective(nn.Module):
    def __init__(self, model: EagleDraftModel, ctc_weight: float = 0.0):
        super().__init__()
        self.model, self.ctc_weight = model, ctc_weight

    def forward(self, convs: list[dict], anchors: list[list[tuple[int, list[int]]]]):
        m, cfg = self.model, self.model.config
        N, device = cfg.num_frames, m.fuse.weight.device
        lengths = [max(t for t, _ in anc) + 1 for anc in anchors]  # context nodes 0..T-1 per conversation
        ctx = [m.inputs(c["hidden"][:T].to(device), c["tokens"][1 : T + 1].to(device)) for c, T in zip(convs, lengths)]
        # Teacher-forced input tokens of branch node i (i = 1..N-1): the anchor's label i-1, the last
        # label repeated past the end of a turn (those positions carry no target).
        branch_tok = [torch.tensor([lab[min(i, len(lab) - 1)] for i in range(N - 1)], device=device)
                      for anc in anchors for _, lab in anc]
        branch_tok = torch.stack(branch_tok)  # (A, N-1)
        anchor_idx = [torch.tensor([t for t, _ in anc], device=device) for anc in anchors]

        frames, branch_x, ctx_out = [], [], None  # frames[j]: (A, H) drafter output at drafted position j
        for j in range(N):  # pass j: the context chain plus, per anchor, its first j branch nodes
            items, xs = [], []
            for b, (T, anc) in enumerate(zip(lengths, anchors)):
                parents = list(range(-1, T - 1))
                for t, _ in anc:
                    parents += [t] + [len(parents) + i for i in range(j - 1)] if j else []
                items.append(ForwardItem(0, 0, [0] * len(parents), parents))
                xs.append(ctx[b])
                if j:
                    xs.append(branch_x_for(branch_x, b, anchors).reshape(-1, ctx[b].shape[-1]))
            batch = build_batch(items, max_model_len=1 << 30, device=device)
            y = m.run(torch.cat(xs), batch.meta, cache=None)  # (rows, H)
            if j == 0:
                ctx_out = [y[batch.offsets[b] : batch.offsets[b] + T] for b, T in enumerate(lengths)]
                g = torch.cat([out[i] for out, i in zip(ctx_out, anchor_idx)])  # (A, H)
            else:
                g = torch.cat([y[batch.offsets[b] + T + j - 1 : batch.offsets[b + 1] : j]
                               for b, T in enumerate(lengths)])  # (A, H): the last node of each branch
            frames.append(g)
            if j < N - 1:
                branch_x.append(m.inputs(g, branch_tok[:, j]))  # (A, H): input of branch node j+1
        return self._loss(convs, anchors, lengths, ctx_out, torch.stack(frames, 1))

    def _loss(self, convs, anchors, lengths, ctx_out, frames):
        """EAGLE-1's per-position loss + cross-entropy of the unrolled frames (A, N, H) [+ CTC]."""
        m, cfg = self.model, self.model.config
        device = frames.device
        g = torch.cat(ctx_out)  # (sum T, H)
        target_h = torch.cat([c["hidden"][1 : T + 1] for c, T in zip(convs, lengths)]).to(device)
        mask = torch.cat([c["assistant"][1 : T + 1] for c, T in zip(convs, lengths)]).to(device).bool()
        target_tok = torch.cat([c["labels"][1 : T + 1] for c, T in zip(convs, lengths)]).to(device)
        reg = F.smooth_l1_loss(g[mask].float(), target_h[mask].float())
        ctx_ce = F.cross_entropy(m.token_logits(g[mask]), target_tok[mask])
        targets = [lab for anc in anchors for _, lab in anc]
        N = cfg.num_frames
        aligned = torch.tensor([[*lab, *[-100] * (N - len(lab))] for lab in targets], device=device)  # (A, N)
        logits = m.token_logits(frames)  # (A, N, V)
        frame_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), aligned.view(-1), ignore_index=-100)
        loss = reg + CLS_WEIGHT * (ctx_ce + frame_ce)
        log_probs = None
        if self.ctc_weight:
            log_probs = m.frame_log_probs(frames)  # (A, N, V+1)
            flat = torch.tensor([tok for lab in targets for tok in lab], device=device)
            lens = torch.tensor([len(lab) for lab in targets], device=device)
            ctc = F.ctc_loss(log_probs.transpose(0, 1), flat, torch.full_like(lens, N), lens, blank=cfg.blank,
                             reduction="mean", zero_infinity=True)
            loss = loss + self.ctc_weight * ctc
        with torch.no_grad():
            greedy = logits.argmax(-1).tolist()
            match = [_prefix_match(gr, lab) for gr, lab in zip(greedy, targets)]
            metrics = {"acc1": sum(x > 0 for x in match) / len(match), "match": sum(match) / len(match),
                       "reg": float(reg)}
            if log_probs is not None:  # how often the blank-aware frames collapse to the labels' prefix
                ctc_match = [_prefix_match(collapse_sequence(gr, cfg.blank), lab)
                             for gr, lab in zip(log_probs.argmax(-1).tolist(), targets)]
                metrics["ctc_match"] = sum(ctc_match) / len(ctc_match)
        return loss, metrics


def branch_x_for(branch_x: list[torch.Tensor], b: int, anchors) -> torch.Tensor:
    """Conversation b's branch inputs so far, anchor-major: (A_b, j, H) from branch_x[i] (A, H)."""
    start = sum(len(a) for a in anchors[:b])
    return torch.stack([x[start : start + len(anchors[b])] for x in branch_x], 1)


def _prefix_match(draft: list[int], target: list[int]) -> int:
    n = 0
    while n < min(len(draft), len(target)) and draft[n] == target[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------- inference


@dataclass
class _Tree:
    """One request's draft tree while it grows. Node 0 is the root (the last committed position);
    `expanded` lists the nodes (root first) whose features are computed, in the order of the
    forward item; `feature[i]` is node i's drafter output, `x[i]` its input row."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    x: dict[int, torch.Tensor]
    feature: dict[int, torch.Tensor]
    expanded: list[int]

    def path(self, i: int) -> list[int]:
        out = []
        while i > 0:
            out.append(self.tokens[i])
            i = self.parents[i]
        return out[::-1]


def _max_tree_nodes(cfg: EagleConfig) -> int:
    """Rows of the largest tree forward after the root: the expanded nodes (cache headroom)."""
    n, width = 0, 1
    for d in range(cfg.depth - 1):
        width = width * cfg.static_topk[d] if cfg.tree == "static" else cfg.dynamic_topk
        n += width
    return n


class EagleDrafter(CachedContextDrafter):
    name = "eagle"
    model: EagleDraftModel

    def __init__(self, model: EagleDraftModel, max_slots: int, max_len: int, catch_up: int = 48):
        super().__init__(model, max_slots, max_len + 1 + _max_tree_nodes(model.config), catch_up)

    @torch.inference_mode()
    def candidates(self, requests: list[ProposeRequest]) -> list[list[Candidate]]:
        trees = self._roots(requests)
        cfg = self.model.config
        floor = math.log(cfg.min_path_prob) if cfg.min_path_prob > 0 else -math.inf
        growing = list(range(len(trees)))
        for d in range(cfg.depth):
            frontier = self._grow([trees[k] for k in growing], d)
            keep = [i for i, f in enumerate(frontier) if f and max(trees[growing[i]].scores[n] for n in f) >= floor]
            growing, frontier = [growing[i] for i in keep], [frontier[i] for i in keep]
            if d + 1 == cfg.depth or not growing:
                break
            self._compute_features([requests[k] for k in growing], [trees[k] for k in growing], frontier)
        return [sorted((Candidate(t.path(i), t.scores[i]) for i in range(1, len(t.tokens))), key=lambda c: -c.score)
                for t in trees]

    def _roots(self, requests: list[ProposeRequest]) -> list[_Tree]:
        """Run the new committed positions (the last one, fused with the pending token, is the
        root); commit all but the root to the cache. Returns one root-only tree per request."""
        m = self.model
        device = m.fuse.weight.device
        states, lens, x = self.new_context(requests)  # x (sum n, H)
        items = [ForwardItem(st.slot, self.cache.lengths[st.slot], [0] * n) for st, n in zip(states, lens)]
        batch = build_batch(items, self.cache.max_len, device)
        y = m.run(x, batch.meta, self.cache)  # (sum n, H)
        trees = []
        for b, (st, n) in enumerate(zip(states, lens)):
            last = batch.offsets[b + 1] - 1
            trees.append(_Tree([requests[b].pending_token], [-1], [0.0], {0: x[last]}, {0: y[last]}, [0]))
            self.cache.advance(st.slot, n - 1)  # the root is recomputed with the tree, then next step
            st.tokens, st.hidden = st.tokens[-1:], [st.hidden[-1][-1:]] if st.hidden else []
        return trees

    def _grow(self, trees: list[_Tree], d: int) -> list[list[int]]:
        """Add depth d+1: children of the nodes expanded at depth d. Returns, per tree, the new
        nodes to expand next (static: all of them; dynamic: the best `dynamic_topk` by path score)."""
        cfg = self.model.config
        parents = [[i for i in t.expanded if self._depth(t, i) == d] for t in trees]
        g = torch.stack([t.feature[i] for t, ps in zip(trees, parents) for i in ps])  # (F, H)
        width = cfg.static_topk[d] if cfg.tree == "static" else cfg.dynamic_topk
        top = torch.log_softmax(self.model.token_logits(g), -1).topk(width)
        values, indices = to_host(top.values).tolist(), to_host(top.indices).tolist()
        frontier, row = [], 0
        for t, ps in zip(trees, parents):
            new = []
            for p in ps:
                for v, tok in zip(values[row], indices[row]):
                    t.tokens.append(tok)
                    t.parents.append(p)
                    t.scores.append(t.scores[p] + v)
                    new.append(len(t.tokens) - 1)
                row += 1
            if cfg.tree == "dynamic":
                new = sorted(new, key=lambda i: -t.scores[i])[: cfg.dynamic_topk]
            frontier.append(new)
        return frontier

    @staticmethod
    def _depth(t: _Tree, i: int) -> int:
        d = 0
        while i > 0:
            i, d = t.parents[i], d + 1
        return d

    def _compute_features(self, requests: list[ProposeRequest], trees: list[_Tree], frontier: list[list[int]]) -> None:
        """One forward over every tree's expanded nodes plus `frontier` (tree attention over the
        cache; nothing committed) to get the frontier's features."""
        m = self.model
        device = m.fuse.weight.device
        new = [(t, i) for t, f in zip(trees, frontier) for i in f]
        x_new = m.inputs(torch.stack([t.feature[t.parents[i]] for t, i in new]),
                         torch.tensor([t.tokens[i] for t, i in new], device=device))  # (F, H)
        for (t, i), x in zip(new, x_new):
            t.x[i] = x
        items, xs = [], []
        for r, t, f in zip(requests, trees, frontier):
            t.expanded += f
            where = {node: k for k, node in enumerate(t.expanded)}
            parents = [-1] + [where[t.parents[i]] for i in t.expanded[1:]]
            slot = self.state[r.seq_id].slot
            items.append(ForwardItem(slot, self.cache.lengths[slot], [0] * len(parents), parents))
            xs += [t.x[i] for i in t.expanded]
        batch = build_batch(items, self.cache.max_len, device)
        y = m.run(torch.stack(xs), batch.meta, self.cache)  # (rows, H)
        for b, (t, f) in enumerate(zip(trees, frontier)):
            first = batch.offsets[b] + len(t.expanded) - len(f)  # the frontier's rows come last
            for k, i in enumerate(f):
                t.feature[i] = y[first + k]
