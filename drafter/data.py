"""Distillation data for drafters: what the frozen base model says about the training corpus.

For each conversation we store its token ids, which positions belong to assistant turns (drafts
are only ever made there), the base model's final-norm hidden state at every position, and its
greedy next-token label at every position (argmax of its logits). A drafter is trained to predict
the base model's own continuation (self-distillation), which is what verification accepts.

Two sources of text: the corpus as written (`teacher` answers of other models), or, with
`regenerate`, each assistant turn rewritten by the base model itself with greedy decoding, so that
the labels along the text are exactly what the base model emits at inference.

Shards are safetensors files of concatenated arrays plus an offsets vector, read back whole.

Stored or online hidden states. Storing (T, H) hidden states suits a small base model (the demo
model's 256 wide); for a 7-8B model (4096 wide) they come to hundreds of GB for a chat corpus. With
`--hidden-states online`, shards hold only token ids and assistant masks, and training runs the
frozen base model over each batch instead (`with_base_outputs`), which yields the hidden states and
the greedy labels of the same forward.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from server.runtime.batch import ForwardItem, build_batch
from server.runtime.host import to_host
from server.runtime.loader import chat_prompt_ids
from server.runtime.model import CausalLM

log = logging.getLogger(__name__)


def question_key(row_id: str) -> str:
    """'gsm8k-720-vc_33b' -> 'gsm8k-720': the question a row answers, whoever the teacher."""
    return "-".join(row_id.split("-")[:2])


def split_corpus(rows: list[dict], heldout_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split by question, so all teachers' answers to one question land on the same side."""
    keys = sorted({question_key(r["id"]) for r in rows})
    random.Random(seed).shuffle(keys)
    heldout = set(keys[: max(1, int(len(keys) * heldout_fraction))])
    train = [r for r in rows if question_key(r["id"]) not in heldout]
    held = [r for r in rows if question_key(r["id"]) in heldout]
    return train, held


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat template's layout, and a 0/1 mask that is 1 on
    assistant content and its end-of-turn token (the positions a model generates)."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        prefix = tokenizer.apply_chat_template([m], tokenize=False)
        content_at = prefix.index(m["content"]) if m["content"] else len(prefix) - len("\n")
        head = tokenizer.encode(prefix[:content_at], add_special_tokens=False)
        body_text = prefix[content_at:].removesuffix("\n")
        body = tokenizer.encode(body_text, add_special_tokens=False)
        tail = tokenizer.encode(prefix[content_at + len(body_text) :], add_special_tokens=False)
        learn = 1 if m["role"] == "assistant" else 0
        ids += head + body + tail
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(tail)
    return ids[:max_len], mask[:max_len]


def load_corpus(path: Path, heldout_fraction: float = 0.05, seed: int = 0) -> list[dict]:
    """The training side of the demo model's split (same fraction and seed), shuffled with a
    fixed seed so that a prefix of it mixes teachers and sources."""
    rows = [json.loads(line) for line in path.open()]
    train, _ = split_corpus(rows, heldout_fraction, seed)
    random.Random(seed).shuffle(train)
    return train


_NUMBER = re.compile(r"\d+")


def perturb_numbers(conversation: list[dict], rng: random.Random) -> list[dict]:
    """The conversation with every number in its user turns replaced by another of as many digits.

    The demo model has memorised its training questions (its training loss is far below its
    held-out loss), so its greedy answers to them are recitations, unlike its answers to new
    questions. With new numbers the question is new to it, and self-distilled answers show the
    drafter the base model as it behaves on held-out prompts. Assistant turns are left alone: they
    are meant to be regenerated."""

    def new_number(m: re.Match) -> str:
        old = m.group(0)
        lo = 10 ** (len(old) - 1) if len(old) > 1 else 0
        for _ in range(8):
            v = str(rng.randint(lo, 10 ** len(old) - 1))
            if v != old:
                return v
        return old

    return [{**m, "content": _NUMBER.sub(new_number, m["content"])} if m["role"] == "user" else dict(m)
            for m in conversation]


def regenerate(engine, tokenizer, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0,
               seed: int = 0) -> list[list[dict]]:
    """Rewrite every assistant turn with the base model's own output, turn by turn (a later turn
    sees the regenerated earlier ones). Runs all conversations through the batched engine.

    temperature 0: greedy, so copies of one question get one answer. temperature > 0: sampled,
    conversation i with seed `seed + i` (reproducible), so copies get different answers from the
    base model's own distribution; the drafter's labels stay the greedy next tokens either way."""
    from server.engine.types import SamplingParams

    convs = [list(c) for c in conversations]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i) for i in range(len(convs))]
    n_turns = max(sum(m["role"] == "assistant" for m in c) for c in convs)
    for turn in range(n_turns):
        todo = {}
        for i, c in enumerate(convs):
            idx = [j for j, m in enumerate(c) if m["role"] == "assistant"]
            if turn < len(idx):
                j = idx[turn]
                prompt = chat_prompt_ids(tokenizer, c[:j])
                if len(prompt) + max_tokens < engine.max_model_len:
                    todo[f"{i}"] = (j, prompt)
        texts = {k: "" for k in todo}
        for k, (_, prompt) in todo.items():
            engine.add_request(k, prompt, params[int(k)])
        bar = tqdm(total=len(todo), desc=f"regenerate turn {turn + 1}", dynamic_ncols=True)
        while engine.has_work():
            for d in engine.step():
                texts[d.request_id] += d.text
                if d.finished:
                    bar.update(1)
        bar.close()
        for k, (j, _) in todo.items():
            convs[int(k)][j] = {"role": "assistant", "content": texts[k]}
    return convs


@torch.inference_mode()
def base_outputs(model: CausalLM, seqs: list[list[int]], max_tokens_per_batch: int = 8192,
                 hidden_dtype: torch.dtype = torch.float16):
    """Final-norm hidden states (T, H) in `hidden_dtype` (fp16 halves what is stored) and greedy
    labels (T,) for each sequence, batched by length through the runtime's forward (one chain per
    sequence)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list = [None] * len(seqs)
    max_len = max(len(s) for s in seqs)
    batch_rows = max(1, max_tokens_per_batch // max_len)
    cache = model.make_cache(batch_rows, max_len)
    bar = tqdm(total=len(seqs), desc="base forward", dynamic_ncols=True)
    i = 0
    while i < len(order):
        width = len(seqs[order[min(i + batch_rows, len(order)) - 1]])
        n = max(1, min(batch_rows, max_tokens_per_batch // width))
        chunk = order[i : i + n]
        items = [ForwardItem(slot, 0, seqs[j]) for slot, j in enumerate(chunk)]
        batch = build_batch(items, max_len, cache.k.device)
        hidden = model(batch, cache)  # (T, H), the chunk's sequences packed
        labels = model.compute_logits(hidden).argmax(-1)
        for b, j in enumerate(chunk):
            rows = slice(batch.offsets[b], batch.offsets[b + 1])
            out[j] = (hidden[rows].to(hidden_dtype).cpu(), labels[rows].cpu())
        i += n
        bar.update(len(chunk))
    bar.close()
    return out


@dataclass
class DistilledSet:
    """Concatenated arrays of many conversations; conversation i spans offsets[i]:offsets[i+1].
    `hidden` and `labels` are None in a set for online training (token ids and masks only)."""

    tokens: torch.Tensor  # (total,) int64
    assistant: torch.Tensor  # (total,) bool
    hidden: torch.Tensor | None  # (total, H) float16
    labels: torch.Tensor | None  # (total,) int64 base greedy next token at each position
    offsets: torch.Tensor  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> list[int]:
        """Tokens in each conversation."""
        return self.offsets.diff().tolist()

    def with_assistant_text(self) -> list[int]:
        """Conversations with something to draft: an assistant token after the first position (a
        prompt longer than distill's --max-len leaves none)."""
        return [i for i in range(len(self)) if self.assistant[int(self.offsets[i]) + 1 : int(self.offsets[i + 1])].any()]

    def conversation(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        arrays = {"tokens": self.tokens, "assistant": self.assistant, "hidden": self.hidden, "labels": self.labels}
        return {k: v[a:b] for k, v in arrays.items() if v is not None}

    def save(self, path: Path) -> None:
        arrays = {"tokens": self.tokens, "assistant": self.assistant.to(torch.uint8), "hidden": self.hidden,
                  "labels": self.labels, "offsets": self.offsets}
        save_file({k: v for k, v in arrays.items() if v is not None}, str(path))

    @classmethod
    def load(cls, path: Path, with_hidden: bool = True) -> DistilledSet:
        """`with_hidden=False` leaves stored hidden states on disk (online training recomputes them)."""
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())

            def get(name: str) -> torch.Tensor | None:
                return f.get_tensor(name) if name in keys else None

            hidden = get("hidden") if with_hidden else None
            return cls(get("tokens"), get("assistant").bool(), hidden, get("labels"), get("offsets"))

    @classmethod
    def concat(cls, parts: list[DistilledSet]) -> DistilledSet:
        offsets, base = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])

        def cat(name: str) -> torch.Tensor | None:
            """An optional array survives only if every part has it."""
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else torch.cat(arrays)

        return cls(cat("tokens"), cat("assistant"), cat("hidden"), cat("labels"), torch.cat(offsets))


def build_distilled(model: CausalLM, encoded: list[tuple[list[int], list[int]]],
                    hidden_dtype: torch.dtype = torch.float16) -> DistilledSet:
    outs = base_outputs(model, [ids for ids, _ in encoded], hidden_dtype=hidden_dtype)
    return DistilledSet(
        tokens=torch.tensor([t for ids, _ in encoded for t in ids], dtype=torch.long),
        assistant=torch.tensor([m for _, mask in encoded for m in mask], dtype=torch.bool),
        hidden=torch.cat([h for h, _ in outs]),
        labels=torch.cat([lab for _, lab in outs]).long(),
        offsets=_offsets(encoded),
    )


def token_set(encoded: list[tuple[list[int], list[int]]]) -> DistilledSet:
    """Token ids and assistant masks only, for online training: no base forward here."""
    return DistilledSet(
        tokens=torch.tensor([t for ids, _ in encoded for t in ids], dtype=torch.long),
        assistant=torch.tensor([m for _, mask in encoded for m in mask], dtype=torch.bool),
        hidden=None, labels=None, offsets=_offsets(encoded),
    )


def _offsets(encoded: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    lengths = torch.tensor([len(ids) for ids, _ in encoded], dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # (n + 1,)


def load_distilled(data_dirs: Path | list[Path], with_hidden: bool = True) -> DistilledSet:
    """Every shard of one or several `distill` output directories, as one set."""
    shards = []
    for data_dir in [data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs:
        found = sorted(Path(data_dir).glob("shard-*.safetensors"))
        if not found:
            raise FileNotFoundError(f"no shard-*.safetensors in {data_dir}: run `ctc-drafter distill` first")
        shards += found
    return DistilledSet.concat([DistilledSet.load(s, with_hidden) for s in shards])


def with_base_outputs(model: CausalLM, convs: list[dict], logit_rows: int = 1024) -> list[dict]:
    """`convs` with "hidden" (T, H) and "labels" (T,) computed now by the frozen base model, on its
    device and in its dtype: what `distill` stores, for online training.

    One cache-free forward over the batch's conversations packed (each a causal chain, seeing only
    itself), so no KV cache is allocated. Labels are the argmax of the base logits, taken
    `logit_rows` rows at a time: a batch's full logits (tokens x vocabulary, fp32) would be 8 GB
    for 16k tokens of a 128k-vocabulary model. The labels come to the host in one copy (anchor
    selection is host code, as with stored labels); hidden states stay on the device, as ordinary
    tensors (not inference tensors), so autograd may save them in the drafter's graph."""
    device = model.lm_head.weight.device
    items = [ForwardItem(0, 0, c["tokens"].tolist()) for c in convs]
    batch = build_batch(items, max_model_len=1 << 30, device=device)
    with torch.inference_mode():
        hidden = model(batch, cache=None)  # (T, H) packed
        labels = torch.cat([model.compute_logits(h).argmax(-1) for h in hidden.split(logit_rows)])  # (T,)
    hidden, labels = hidden.clone(), to_host(labels)
    off = batch.offsets
    return [{**c, "hidden": hidden[off[b] : off[b + 1]], "labels": labels[off[b] : off[b + 1]]}
            for b, c in enumerate(convs)]
