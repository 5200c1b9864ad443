"""Training drafters on distilled data (data.py): the CTC module and the baselines (Medusa, Hydra, EAGLE-style).

Anchors. A training example is an anchor position t inside an assistant turn: the drafter sees
the context up to t (hidden states h_<=t and tokens x_<=t+1, x_{t+1} playing the pending token)
and must spell the base model's next tokens, labels[t+1 : t+1+K] (labels[j] = the base model's
greedy token after x_<=j), cut at the end of the assistant turn.

CTC objective. All anchors of a conversation go through ONE forward: the context is a causal
chain and each anchor hangs a branch of N frame queries off context node t, so the tree mask
makes frames see exactly x_<=t and their own earlier frames (the layout inference uses), with
positions t+1..t+N. Loss = CTC(frames, labels) (+ optional auxiliary cross-entropy that pins
frame j to label j, a valid alignment, weighted by --aux-weight).

Medusa objective: head k's cross-entropy against labels[t+k], at every anchor. Hydra's and the
EAGLE-style drafter's objectives live beside their models (hydra.py, eagle.py); `make_objective`
picks one by the drafter's kind.

Distributed: launched by torchrun (WORLD_SIZE > 1), the objective is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA); ranks draw disjoint conversations from the
same shuffled order (batches.py) and rank 0 writes checkpoints.

Large base models (7-8B). Three options keep the drafter's training within one GPU per rank:
- hidden states online (`HiddenStates.ONLINE`): each step runs the frozen base model over its
  batch (data.with_base_outputs) instead of reading stored (T, H) arrays;
- bf16 autocast (`autocast_bf16`): the drafter's forward runs its matmuls in bfloat16 while its
  weights, gradients and AdamW state stay float32 (master weights); no loss scaling is needed, as
  bf16 has float32's exponent range;
- token-budget batches (`max_tokens_per_batch`, batches.py).
The base model is the caller's: load it in bf16 and frozen (requires_grad False). It stays outside
the DDP module and the optimizer, so it has no gradients, no optimizer state and no all-reduce;
each rank holds a full bf16 copy (16 GB for 8B), which its own forward needs anyway.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from drafter.batches import FixedCountBatches, TokenBudgetBatches
from drafter.collapse import collapse_sequence
from drafter.ctc import CTCDraftModel
from drafter.data import DistilledSet, with_base_outputs
from drafter.eagle import EagleObjective
from drafter.hydra import HydraObjective
from drafter.loading import save_drafter
from drafter.medusa import MedusaHeads
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.model import CausalLM

log = logging.getLogger(__name__)


class HiddenStates(str, Enum):
    """Where the base model's hidden states and greedy labels come from."""

    STORED = "stored"  # the distilled shards (`distill` stored them)
    ONLINE = "online"  # the frozen base model, run over each batch during training


@dataclass
class TrainConfig:
    steps: int = 1500
    conversations_per_step: int = 8
    anchors_per_conversation: int | None = None  # sampled per conversation; None: the kind's default
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.3  # AdamW, decoupled: the best of 0, 0.1, 0.3, 1.0 on the demo model
    aux_weight: float = 0.0
    ctc_weight: float = 0.0  # EAGLE-style drafter: weight of the auxiliary CTC loss (the CTC-drafter authors': 0.01)
    checkpoint_every: int = 100
    seed: int = 0
    max_tokens_per_batch: int | None = None  # per rank; None: conversations_per_step conversations
    hidden_states: HiddenStates = HiddenStates.STORED
    autocast_bf16: bool = False  # the drafter's forward under bf16 autocast (fp32 master weights)
    init: str | None = None  # the drafter whose weights training started from (`train --init`); a record only

    def __post_init__(self) -> None:
        if self.anchors_per_conversation is not None and self.anchors_per_conversation < 0:
            raise ValueError(f"anchors per conversation (--anchors) must be >= 0, 0 meaning every anchor; "
                             f"got {self.anchors_per_conversation}")


# Anchors sampled per conversation and step when TrainConfig leaves it to the kind: the CTC and
# EAGLE-style objectives cost decoder rows per anchor (N frames; a tree of depth K), so they sample;
# Medusa's and Hydra's heads are cheap next to the LM head they share, so they take every anchor.
DEFAULT_ANCHORS = {"ctc": 24, "eagle": 24}


def anchors_per_conversation(kind: str, cfg: TrainConfig) -> int | None:
    """How many anchors a conversation contributes per step; None: every one (0 also means that)."""
    n = cfg.anchors_per_conversation if cfg.anchors_per_conversation is not None else DEFAULT_ANCHORS.get(kind)
    return n or None


def anchor_targets(conv: dict, K: int) -> list[tuple[int, list[int]]]:
    """(t, labels[t+1 : t+1+k]) for every anchor t whose pending position t+1 is assistant text."""
    assistant, labels = conv["assistant"].tolist(), conv["labels"].tolist()
    T = len(labels)
    out = []
    for t in range(T - 1):
        k = 0
        while k < K and t + 1 + k < T and assistant[t + 1 + k]:
            k += 1
        if k:
            out.append((t, labels[t + 1 : t + 1 + k]))
    return out


class CTCObjective(nn.Module):
    def __init__(self, model: CTCDraftModel, aux_weight: float = 0.0):
        super().__init__()
        self.model, self.aux_weight = model, aux_weight

    def forward(self, convs: list[dict], anchors: list[list[tuple[int, list[int]]]]):
        m, cfg = self.model, self.model.config
        N = cfg.num_frames
        device = m.fuse.weight.device
        items, xs = [], []
        for conv, anc in zip(convs, anchors):
            T = max(t for t, _ in anc) + 1  # context nodes 0..T-1
            parents = list(range(-1, T - 1))
            for t, _ in anc:
                parents += [t] + [len(parents) + j for j in range(N - 1)]
            items.append(ForwardItem(0, 0, [0] * len(parents), parents))
            ctx = m.inputs(conv["hidden"][:T].to(device), conv["tokens"][1 : T + 1].to(device))
            frames = m.frame_inputs(ctx[torch.tensor([t for t, _ in anc], device=device)])  # (A, N, H)
            xs.append(torch.cat([ctx, frames.flatten(0, 1)]))
        batch = build_batch(items, max_model_len=1 << 30, device=device)
        y = m.run(torch.cat(xs).to(m.fuse.weight.dtype), batch.meta, cache=None)  # (T, H), items packed
        # each item ends with its anchors' frames
        frames = torch.cat([y[batch.offsets[b + 1] - len(anc) * N : batch.offsets[b + 1]]
                            for b, anc in enumerate(anchors)])
        log_probs = torch.log_softmax(m.frame_logits(frames), -1).view(-1, N, cfg.base_vocab_size + 1)  # (A, N, V+1)
        targets = [lab for anc in anchors for _, lab in anc]
        flat = torch.tensor([tok for lab in targets for tok in lab], device=device)
        lengths = torch.tensor([len(lab) for lab in targets], device=device)
        loss = F.ctc_loss(log_probs.transpose(0, 1), flat, torch.full_like(lengths, N), lengths,
                          blank=cfg.blank, reduction="mean", zero_infinity=True)
        if self.aux_weight:
            K = max(len(lab) for lab in targets)
            aligned = torch.full((len(targets), K), -100, device=device)
            for i, lab in enumerate(targets):
                aligned[i, : len(lab)] = torch.tensor(lab)
            loss = loss + self.aux_weight * F.cross_entropy(log_probs[:, :K].reshape(-1, log_probs.shape[-1]),
                                                            aligned.view(-1), ignore_index=-100)
        with torch.no_grad():
            greedy = log_probs.argmax(-1).tolist()
            match = [_prefix_match(collapse_sequence(g, cfg.blank), lab) for g, lab in zip(greedy, targets)]
        return loss, {"acc1": sum(x > 0 for x in match) / len(match), "match": sum(match) / len(match)}


class MedusaObjective(nn.Module):
    def __init__(self, model: MedusaHeads):
        super().__init__()
        self.model = model

    def forward(self, convs: list[dict], anchors: list[list[tuple[int, list[int]]]]):
        K = self.model.config.num_heads
        device = next(self.model.parameters()).device
        hidden = torch.cat([c["hidden"][[t for t, _ in anc]] for c, anc in zip(convs, anchors)]).to(device)
        targets = torch.full((len(hidden), K), -100, dtype=torch.long, device=device)
        for i, lab in enumerate(lab for anc in anchors for _, lab in anc):
            targets[i, : len(lab)] = torch.tensor(lab)
        logits = self.model.logits(hidden)  # (A, K, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)
        with torch.no_grad():
            hit = logits.argmax(-1) == targets  # (A, K)
            match = torch.cumprod(hit.long(), dim=1).sum(1).float()
        return loss, {"acc1": float(hit[:, 0].float().mean()), "match": float(match.mean())}


def make_objective(draft: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The training objective of `draft`'s kind: (convs, anchors) -> (loss, metrics)."""
    kind = draft.config.kind
    if kind == "ctc":
        return CTCObjective(draft, cfg.aux_weight)
    if kind == "eagle":
        return EagleObjective(draft, cfg.ctc_weight)
    if kind == "hydra":
        return HydraObjective(draft)
    if kind == "medusa":
        return MedusaObjective(draft)
    raise ValueError(f"no training objective for drafter kind {kind!r}")


def _prefix_match(draft: list[int], target: list[int]) -> int:
    n = 0
    while n < min(len(draft), len(target)) and draft[n] == target[n]:
        n += 1
    return n


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def batch_conversations(data: DistilledSet, ids: list[int], base: CausalLM | None) -> list[dict]:
    """Conversations `ids` of `data`, with hidden states and labels: stored ones, or with `base`
    given, computed now by it (online)."""
    convs = [data.conversation(i) for i in ids]
    return with_base_outputs(base, convs) if base is not None else convs


def _check_sources(data: DistilledSet, cfg: TrainConfig, base: CausalLM | None) -> None:
    if cfg.hidden_states == HiddenStates.ONLINE and base is None:
        raise ValueError("online hidden states need the base model: train(..., base=model)")
    if cfg.hidden_states == HiddenStates.STORED and (data.hidden is None or data.labels is None):
        raise ValueError("the data holds no hidden states (distilled with --hidden-states online): "
                         "train with --hidden-states online")


def _batches(data: DistilledSet, cfg: TrainConfig, world: int) -> FixedCountBatches | TokenBudgetBatches:
    if not cfg.max_tokens_per_batch:
        return FixedCountBatches(len(data), cfg.conversations_per_step, world, cfg.seed)
    # Only conversations with anchors: a batch of none would leave its rank without a loss, and
    # under DDP the other ranks would wait for its gradients forever.
    ids = data.with_assistant_text()
    lengths = data.lengths()
    return TokenBudgetBatches([lengths[i] for i in ids], cfg.max_tokens_per_batch, world, cfg.seed, ids)


def train(draft: nn.Module, data: DistilledSet, out_dir: Path, cfg: TrainConfig,
          base: CausalLM | None = None) -> dict:
    """Train `draft` (attached to its base) on `data`; checkpoints in out_dir/.train, resumable;
    the final drafter is written to out_dir. Returns the last metrics. `base`: the frozen base
    model, needed with online hidden states (cfg.hidden_states)."""
    _check_sources(data, cfg, base)
    rank, world = _dist()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    K = draft.config.num_labels
    objective = make_objective(draft, cfg)
    sample_anchors = anchors_per_conversation(draft.config.kind, cfg)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    work = out_dir / ".train"
    step = 0
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log.info("resumed %s at step %d", ckpt, step)
    model = objective
    if world > 1:
        model = nn.parallel.DistributedDataParallel(objective)

    batches = _batches(data, cfg, world)
    online = base if cfg.hidden_states == HiddenStates.ONLINE else None
    device_type = params[0].device.type
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {draft.config.kind}", disable=rank != 0, dynamic_ncols=True)
    metrics: dict = {}
    t0 = time.time()
    while step < cfg.steps:
        convs = batch_conversations(data, batches.ids(step, rank), online)
        anchors = [anchor_targets(c, K) for c in convs]
        pick = random.Random(cfg.seed * 1_000_003 + step * world + rank)
        if sample_anchors:
            anchors = [pick.sample(a, min(len(a), sample_anchors)) for a in anchors]
        keep = [i for i, a in enumerate(anchors) if a]
        convs, anchors = [convs[i] for i in keep], [anchors[i] for i in keep]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(device_type, dtype=torch.bfloat16) if cfg.autocast_bf16 else nullcontext():
            loss, metrics = model(convs, anchors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        metrics = {"loss": float(loss.detach()), **metrics}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['acc1']:.2f}", match=f"{metrics['match']:.2f}")
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            work.mkdir(parents=True, exist_ok=True)
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    bar.close()
    metrics["train_minutes_this_run"] = round((time.time() - t0) / 60, 2)
    if rank == 0:
        save_drafter(draft, out_dir, extra={"training": {**asdict(cfg), "final": metrics}})
    if world > 1:
        torch.distributed.barrier()
    return metrics
