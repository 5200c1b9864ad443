"""Hydra heads: sequentially dependent draft heads (Ankner et al., 2024, arXiv 2402.05109).

Medusa's head k guesses the token k positions after the pending token from the base hidden state
alone, blind to what the heads before it guessed. A Hydra head also reads the tokens of the draft
so far: head k sees [h_t ; E(p) ; E(d_1) ; ... ; E(d_k)], where h_t is the base model's final-norm
hidden state of the last committed token, p the pending token (the tree root) and d_1..d_k the
tokens drafted before it, and predicts d_{k+1} through the frozen base LM head. So drafts are
coherent sequences, not independent per-position guesses; the price is that the tree must be
grown depth by depth (one batched head call per depth) instead of in one shot.

Each head is an input projection ((k + 2) H -> H) followed by residual SiLU blocks, as in Medusa.
The Hydra paper's best variant adds a prefix-attention layer over the context; this is the plain
MLP variant (its "Hydra" row), the one the CTC-drafter paper compares against.

Training (`HydraObjective`) is teacher-forced: the drafted tokens fed to head k are the base
model's own greedy tokens (the labels), which is what an accepted draft consists of.
Inference expands a static tree: every node at depth k gets the top `topk_per_head[k]` tokens of
head k as children (e.g. [4, 3, 2, 2] -> 4, 12, 24, 48 nodes); every root-to-node path is a
candidate scored by its summed log-probability, and the engine's node budget keeps the best.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from drafter.base import LastHiddenDrafter, ProposeRequest
from drafter.candidates import Candidate
from drafter.loading import borrow
from drafter.medusa import ResBlock
from server.runtime.config import ModelConfig
from server.runtime.host import to_host
from server.runtime.model import CausalLM


@dataclass
class HydraConfig:
    base_architecture: str
    base_hidden_size: int
    base_vocab_size: int
    num_heads: int = 4  # K: tokens drafted after the pending token
    num_layers: int = 1  # residual blocks per head, after its input projection
    topk_per_head: list[int] = field(default_factory=lambda: [4, 3, 2, 2])
    kind: str = "hydra"

    def __post_init__(self) -> None:
        if len(self.topk_per_head) < self.num_heads or min(self.topk_per_head) < 1:
            raise ValueError(f"topk_per_head needs {self.num_heads} entries >= 1, got {self.topk_per_head}")

    @property
    def num_labels(self) -> int:
        return self.num_heads

    @classmethod
    def for_base(cls, base: ModelConfig, **overrides) -> HydraConfig:
        defaults = dict(base_architecture=base.architecture, base_hidden_size=base.hidden_size,
                        base_vocab_size=base.vocab_size)
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class HydraHead(nn.Module):
    """Head k: [h ; E(p) ; E(d_1..d_k)] ((k + 2) H) -> (H) features for the base LM head."""

    def __init__(self, hidden: int, k: int, num_layers: int):
        super().__init__()
        self.proj = nn.Linear((k + 2) * hidden, hidden)
        with torch.no_grad():  # starts as "h": head 0 begins as the base model's own next-token head
            self.proj.weight.zero_()
            self.proj.weight[:, :hidden] = torch.eye(hidden)
            self.proj.bias.zero_()
        self.blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(num_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.proj(x))


class HydraHeads(nn.Module):
    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.config = cfg
        H = cfg.base_hidden_size
        self.heads = nn.ModuleList(HydraHead(H, k, cfg.num_layers) for k in range(cfg.num_heads))
        self._base: tuple[nn.Embedding, nn.Linear] | None = None

    def attach_base(self, base: CausalLM) -> HydraHeads:
        dtype = self.heads[0].proj.weight.dtype
        # A tuple: borrowed (a copy in our dtype if it differs), frozen, not registered, not saved.
        self._base = (borrow(base.model.embed_tokens, dtype), borrow(base.lm_head, dtype))
        return self

    def head_logits(self, k: int, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Head k: hidden (B, H), prefix (B, k + 1) token ids [p, d_1..d_k] -> (B, V) float32 logits."""
        embed, lm_head = self._base
        x = torch.cat([hidden.to(lm_head.weight.dtype), embed(prefix).flatten(1)], dim=-1)  # (B, (k + 2) H)
        return lm_head(self.heads[k](x)).float()


class HydraObjective(nn.Module):
    """Teacher-forced cross-entropy of every head at every anchor (anchors as in train.py)."""

    def __init__(self, model: HydraHeads):
        super().__init__()
        self.model = model

    def forward(self, convs: list[dict], anchors: list[list[tuple[int, list[int]]]]):
        K = self.model.config.num_heads
        device = self.model.heads[0].proj.weight.device
        flat = [(c, t, lab) for c, anc in zip(convs, anchors) for t, lab in anc]
        hidden = torch.stack([c["hidden"][t] for c, t, _ in flat]).to(device)  # (A, H)
        # [p, labels...] padded with p where a turn ends early (those targets are ignored)
        pending = [int(c["tokens"][t + 1]) for c, t, _ in flat]
        prefix = torch.tensor([[p, *lab, *[p] * (K - len(lab))] for p, (_, _, lab) in zip(pending, flat)],
                              device=device)  # (A, K + 1)
        targets = torch.tensor([[*lab, *[-100] * (K - len(lab))] for _, _, lab in flat], device=device)  # (A, K)
        logits = torch.stack([self.model.head_logits(k, hidden, prefix[:, : k + 1]) for k in range(K)], 1)  # (A, K, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)
        with torch.no_grad():
            hit = logits.argmax(-1) == targets  # (A, K)
            match = torch.cumprod(hit.long(), dim=1).sum(1).float()
        return loss, {"acc1": float(hit[:, 0].float().mean()), "match": float(match.mean())}


class HydraDrafter(LastHiddenDrafter):
    name = "hydra"
    model: HydraHeads

    @torch.inference_mode()
    def candidates(self, requests: list[ProposeRequest]) -> list[list[Candidate]]:
        """Grow every request's static tree depth by depth, all requests' nodes of a depth in one
        head call. Rows of `prefix` are the frontier's paths [p, d_1..d_k]; `owner` says whose."""
        cfg, device = self.model.config, self.model.heads[0].proj.weight.device
        hidden = torch.stack([self.last_hidden[r.seq_id] for r in requests]).to(device)  # (B, H)
        owner = torch.arange(len(requests), device=device)  # (F,) request of each frontier path
        prefix = torch.tensor([[r.pending_token] for r in requests], device=device)  # (F, 1)
        score = torch.zeros(len(requests), dtype=torch.float64, device=device)  # (F,)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for k in range(cfg.num_heads):
            top = torch.log_softmax(self.model.head_logits(k, hidden[owner], prefix), -1).topk(cfg.topk_per_head[k])
            n = top.indices.shape[1]
            prefix = torch.cat([prefix.repeat_interleave(n, 0), top.indices.reshape(-1, 1)], 1)  # (F n, k + 2)
            score = score.repeat_interleave(n) + top.values.reshape(-1).double()  # (F n,)
            owner = owner.repeat_interleave(n)
            found.append((owner, prefix, score))
        out: list[list[Candidate]] = [[] for _ in requests]
        for own, pre, sc in found:  # every node's path is a candidate: the trie keeps the best
            for b, toks, s in zip(to_host(own).tolist(), to_host(pre[:, 1:]).tolist(), to_host(sc).tolist()):
                out[b].append(Candidate(toks, s))
        return [sorted(c, key=lambda c: -c.score) for c in out]
