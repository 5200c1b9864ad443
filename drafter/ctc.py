"""The CTC draft module (the Attention Draft Module of CTC-drafter, arXiv 2412.00061).

Architecture. Context position t carries the frozen base model's final-norm hidden state h_t
fused with the embedding of the token that follows it, x_{t+1}:  c_t = W [h_t ; E(x_{t+1})].
For the last committed position, x_{t+1} is the sequence's pending token (the tree root). After
the context come N learned frame queries; a few Llama decoder layers (the runtime's own, so one
attention implementation serves base and drafter) run over [c_1..c_T, f_1..f_N] causally, and each
frame is read out through the base model's frozen LM head plus one extra output, the CTC blank:
frame j gives a distribution over V + 1 symbols. One forward yields all N frames. With
`frame_inputs="anchored"` frame j's input is f_j + c_T, so every frame starts from the last
position's state (on the demo model: 2.31 -> 2.54 tokens per step at equal training, BENCHMARKS.md).

Training (train.py) aligns the N frames to the next K tokens the base model would produce with
CTC loss; inference collapses frame sequences (merge repeats, drop blanks) into candidate drafts.

Its own KV cache. Each context position's K/V depend only on h_t and x_{t+1}, both final once t
is committed (the root is always committed, so the pending token used at t = last stays right),
so the drafter keeps a slot KV cache like the base model's and each step processes only the
positions committed since the last step plus the N frames, whose K/V are never kept.

Catching up. While a sequence decodes without drafts (the governor chose plain steps), tokens pile
up for the drafter; its next forward would process them all, a prefill as long as the plain run,
and that made a re-check after a long plain stretch cost several plain steps. So once the prompt is
in, the drafter catches up on the last `catch_up` tokens only: older skipped positions are left out
of its cache (positions there are the cache's own, so the window sits right after the text it has).
A draft does not change the output, only how much of it is accepted, and the recent tokens and the
prompt are what a draft of the next few tokens leans on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from drafter.base import LookAhead, ProposeRequest
from drafter.candidates import (
    Candidate,
    beam_search,
    beam_search_inputs,
    static_tree_search,
    static_tree_shape,
    static_tree_topk,
)
from drafter.decoder import CachedContextDrafter, DecoderOverBase, DraftLayersConfig
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.host import to_host
from server.runtime.model import DecoderLayer, RMSNorm


CANDIDATE_SEARCHES = ("beam", "static")  # CTCDrafterConfig.candidates
FRAME_INPUTS = ("queries", "anchored")  # CTCDrafterConfig.frame_inputs


@dataclass
class CTCDrafterConfig(DraftLayersConfig):
    base_architecture: str
    base_hidden_size: int
    base_vocab_size: int
    num_frames: int = 6  # N: frames per draft (> the tokens it can draft, so blanks/repeats fit)
    num_labels: int = 4  # K: next base tokens each draft is trained to spell
    num_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    candidates: str = "beam"  # "beam": CTC prefix beam search; "static": top-k per frame (the paper)
    beam_width: int = 8
    # Beam search extends each prefix by a frame's top tokens only. 3: at an 8-node tree the beam
    # search's host half costs half of what top-6 costs for 0.1-0.3% fewer tokens per step (on the
    # demo model at batch 1, +1.2-1.7% speed; BENCHMARKS.md, "A cheaper candidate search, and the
    # rest of the corpus").
    prune_topk: int = 3
    static_topk: list[int] = field(default_factory=lambda: [4, 3, 2, 2, 1, 1])
    # "queries": frame j's input is the learned query q_j alone, and the frames find the last
    # context position through attention; "anchored": q_j + c_T, the last context position's input
    # (h_T fused with the pending token), so every frame starts from the state it drafts after,
    # as the paper's draft heads read the draft module's output at the last position.
    frame_inputs: str = "queries"
    kind: str = "ctc"

    def __post_init__(self) -> None:
        if self.num_frames < self.num_labels:
            raise ValueError(f"num_frames ({self.num_frames}) must be >= num_labels ({self.num_labels})")
        if self.frame_inputs not in FRAME_INPUTS:
            raise ValueError(f"frame_inputs must be one of {FRAME_INPUTS}, got {self.frame_inputs!r}")
        if self.candidates not in CANDIDATE_SEARCHES:
            raise ValueError(f"candidates must be one of {CANDIDATE_SEARCHES}, got {self.candidates!r}")
        # The static tree branches once per frame: fit its top-k list to N (extra frames: top-1).
        self.static_topk = (list(self.static_topk) + [1] * self.num_frames)[: self.num_frames]


class CTCDraftModel(DecoderOverBase):
    """Trainable part: fuse, decoder layers, final norm, frame queries, blank head. The base
    embedding and LM head are borrowed (frozen, not saved): `attach_base` sets them."""

    def __init__(self, cfg: CTCDrafterConfig):
        super().__init__()
        self.config = cfg
        H = cfg.base_hidden_size
        lc = cfg.layer_config()
        self.fuse = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(lc, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.frame_queries = nn.Parameter(torch.randn(cfg.num_frames, H) * 0.02)
        self.blank_head = nn.Linear(H, 1)
        self.init_rope()

    def frame_inputs(self, last: torch.Tensor) -> torch.Tensor:
        """The N frame rows drafted after context inputs `last` (B, H): (B, N, H)."""
        q = self.frame_queries.to(last.dtype)
        if self.config.frame_inputs == "anchored":
            return q + last[:, None]
        return q.expand(last.shape[0], -1, -1)

    def frame_logits(self, y: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V + 1) float32: the base LM head's logits, then the blank's."""
        _, lm_head = self.base
        return torch.cat([lm_head(y), self.blank_head(y)], dim=-1).float()


class CTCDrafter(CachedContextDrafter):
    """Inference: one batched drafter forward per step for every sequence that asks for a draft."""

    name = "ctc"
    merge = "sum"  # candidates are collapsed outputs: each the probability of being the whole draft
    model: CTCDraftModel

    def __init__(self, model: CTCDraftModel, max_slots: int, max_len: int, catch_up: int = 48):
        super().__init__(model, max_slots, max_len + model.config.num_frames, catch_up)

    @torch.inference_mode()
    def frames(self, requests: list[ProposeRequest]) -> torch.Tensor:
        """Run the drafter for each request: new context positions + N frames. Returns frame
        log-probs (B, N, V+1) and commits the context positions to the drafter cache."""
        m, N = self.model, self.model.config.num_frames
        device = m.fuse.weight.device
        states, lens, x = self.new_context(requests)
        ctx = x.split(lens)  # n_b x H each
        items = [ForwardItem(st.slot, self.cache.lengths[st.slot], [0] * (n + N)) for st, n in zip(states, lens)]
        batch = build_batch(items, self.cache.max_len, device)
        frames = m.frame_inputs(torch.stack([c[-1] if len(c) else st.last_input for c, st in zip(ctx, states)]))
        x = torch.cat([t for c, f in zip(ctx, frames) for t in (c, f)])  # (T, H) packed: n_b + N rows each
        y = m.run(x, batch.meta, self.cache)  # (T, H)
        y = torch.stack([y[end - N : end] for end in batch.offsets[1:]])  # (B, N, H): each item's last N rows
        for st, n, c in zip(states, lens, ctx):
            self.cache.advance(st.slot, n)
            st.tokens, st.hidden = [], []
            if n:
                st.last_input = c[-1]
        return torch.log_softmax(m.frame_logits(y), dim=-1)

    def candidates(self, requests: list[ProposeRequest]) -> list[list[Candidate]]:
        """Frames and their top-k on the device; one small copy (B, N, O(k) values, whatever the
        vocabulary); the candidate search on the host (candidates.py). Requests whose frames the
        look-ahead computed last step make no forward and no copy here."""
        ready = self.take_ready(requests)
        rest = [r for i, r in enumerate(requests) if i not in ready]
        fresh = iter(to_host(self._device_half(self.frames(rest))) if rest else ())
        return self._host_half(torch.stack([ready[i] if i in ready else next(fresh) for i in range(len(requests))]))

    @torch.inference_mode()
    def look_ahead(self, ahead: LookAhead) -> torch.Tensor | None:
        """Next step's frames over this step's accepted paths (decoder.CachedContextDrafter), as the
        device half of the candidate search."""
        done = self.ahead_forward(ahead, self.model.config.num_frames, self.model.frame_inputs)
        if done is None:
            return None
        _, y = done
        return self._device_half(torch.log_softmax(self.model.frame_logits(y), dim=-1))

    def _device_half(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(B, N, V + 1) frame log-probs -> the candidate search's (B, ., O(k)) inputs, on the device."""
        cfg = self.model.config
        if cfg.candidates == "beam":
            return beam_search_inputs(log_probs, cfg.blank, cfg.prune_topk)  # (B, N, k + N k + 1)
        depth, k = static_tree_shape(cfg.static_topk)
        return static_tree_topk(log_probs, depth, k)  # (B, depth, 2k)

    def _host_half(self, packed: torch.Tensor) -> list[list[Candidate]]:
        cfg = self.model.config
        if cfg.candidates == "beam":
            return beam_search(packed, cfg.blank, cfg.beam_width)
        return static_tree_search(packed, cfg.blank, cfg.static_topk)
