"""Medusa heads: the CTC-drafter paper's main baseline (Cai et al., 2024, arXiv 2401.10774).

K independent heads read the base model's last hidden state h_t; head k (a residual SiLU block)
feeds the frozen base LM head to predict the token k positions after the pending token, each
trained with cross-entropy on its own position. Unlike the CTC module, a head sees neither the
pending token nor the other heads' choices, so its drafts are independent guesses per position;
candidates are the top-k per head combined over a static tree, as in Medusa.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from drafter.base import LastHiddenDrafter, ProposeRequest
from drafter.candidates import Candidate
from drafter.loading import borrow
from server.runtime.config import ModelConfig
from server.runtime.host import to_host
from server.runtime.model import CausalLM


@dataclass
class MedusaConfig:
    base_architecture: str
    base_hidden_size: int
    base_vocab_size: int
    num_heads: int = 4  # K: positions drafted after the pending token
    num_layers: int = 1  # residual blocks per head
    topk_per_head: list[int] = field(default_factory=lambda: [4, 3, 2, 2])
    kind: str = "medusa"

    @property
    def num_labels(self) -> int:
        return self.num_heads

    @classmethod
    def for_base(cls, base: ModelConfig, **overrides) -> MedusaConfig:
        defaults = dict(base_architecture=base.architecture, base_hidden_size=base.hidden_size,
                        base_vocab_size=base.vocab_size)
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head k begins as the base head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.config = cfg
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(cfg.base_hidden_size) for _ in range(cfg.num_layers))) for _ in range(cfg.num_heads)
        )
        self._lm_head: tuple[nn.Linear] | None = None

    def attach_base(self, base: CausalLM) -> MedusaHeads:
        dtype = next(self.parameters(), base.lm_head.weight).dtype  # heads without blocks: the base's
        self._lm_head = (borrow(base.lm_head, dtype),)  # borrowed (a copy in our dtype if it differs), frozen, not saved
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> (..., K, V) float32, head k predicting position k after the pending token."""
        (lm_head,) = self._lm_head
        h = hidden.to(lm_head.weight.dtype)
        return torch.stack([lm_head(head(h)) for head in self.heads], dim=-2).float()


def heads_topk(log_probs: torch.Tensor, topk_per_head: list[int]) -> torch.Tensor:
    """Device half: log_probs (B, K, V) -> (B, K', 2k) packed [values | ids] of each head's top k,
    K' = the heads that draft (min(K, len(topk_per_head))), k = max(topk_per_head). Ids travel as
    float32 (exact below 2**24), so one small copy carries both, whatever the vocabulary."""
    heads, vocab = min(log_probs.shape[1], len(topk_per_head)), log_probs.shape[2]
    if vocab > 1 << 24:
        raise ValueError(f"vocabulary of {vocab}: ids above 2**24 are not exact in float32")
    top = log_probs[:, :heads].float().topk(max(topk_per_head[:heads]), dim=-1)  # (B, K', k) each
    return torch.cat([top.values, top.indices.float()], dim=-1)


def medusa_candidates(packed: torch.Tensor, topk_per_head: list[int]) -> list[Candidate]:
    """Host half, one sequence: `heads_topk`'s (K', 2k) -> every combination of the heads' top
    tokens (its prefixes come from the trie), scored by summed log-probability, best first."""
    k = packed.shape[-1] // 2
    top = [(packed[h, :n], packed[h, k : k + n].long()) for h, n in enumerate(topk_per_head[: packed.shape[0]])]
    cands = []
    for ranks in itertools.product(*(range(len(ids)) for _, ids in top)):
        toks = [int(top[h][1][r]) for h, r in enumerate(ranks)]
        score = float(sum(top[h][0][r] for h, r in enumerate(ranks)))  # float32 sums, as the scores always were
        cands.append(Candidate(toks, score))
    cands.sort(key=lambda c: -c.score)
    return cands


class MedusaDrafter(LastHiddenDrafter):
    name = "medusa"
    merge = "sum"  # candidates are whole combinations of the heads' tokens (their prefixes are not listed)
    model: MedusaHeads

    @torch.inference_mode()
    def candidates(self, requests: list[ProposeRequest]) -> list[list[Candidate]]:
        h = torch.stack([self.last_hidden[r.seq_id] for r in requests])  # (B, H)
        topk = self.model.config.topk_per_head
        log_probs = torch.log_softmax(self.model.logits(h), dim=-1)  # (B, K, V) on the device
        packed = to_host(heads_topk(log_probs, topk))  # (B, K', 2k): one small copy
        return [medusa_candidates(p, topk) for p in packed]
