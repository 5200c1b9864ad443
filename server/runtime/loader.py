"""Load a Hugging Face checkpoint directory into our CausalLM, plus its tokenizer.

Reads config.json, one model.safetensors or the shards listed in model.safetensors.index.json,
and the tokenizer (with its chat template) through transformers' AutoTokenizer.

Lean by construction: peak memory while loading is the final weights plus one 4 MiB read buffer
(safetensors_io.py), not a second copy of the model. The model is built and fused (q|k|v, gate|up) on the
meta device, where it holds no data; then every parameter is allocated once, empty, in the target
dtype on the target device; then the shards are streamed a chunk of rows at a time, each copied
(cast on the way) into its place, a q/k/v or gate/up part straight into its rows of the fused
matrix. Keeping a state dict of unfused tensors alive while fusing, as a naive loader does, holds
the attention and MLP weights twice at the peak (~25 GB instead of 16 for a Llama-3-8B), so a
24 GB card that fits weights and cache could not start.

With tensor parallelism (`shard=`, parallel/shard.py) a rank builds only its part of the model and
reads only its slice of each sharded tensor, so its peak is its own weights, about 1/N of the
layers, plus one read buffer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.runtime.config import ModelConfig, ModelConfigError
from server.runtime.model import MLP, Attention, CausalLM
from server.runtime.parallel.shard import SourceSlice, TensorShard, shard_model
from server.runtime.rope import inverse_frequencies
from server.runtime.safetensors_io import ChunkedReader, SafetensorsError, TensorInfo, read_header

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers some older checkpoints carry; we compute them ourselves.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 where it is fast, fp32 on the CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelConfigError(f"dtype {dtype!r} not supported; choose auto, {', '.join(DTYPES)}") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelConfigError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


@dataclass(frozen=True)
class Destination:
    """Where a checkpoint tensor goes: rows [start, start + rows) of `param` (all rows if unfused);
    `source`: the slice of the checkpoint tensor to read (a tensor-parallel rank's), None = whole."""

    param: nn.Parameter
    start: int
    rows: int
    source: SourceSlice | None = None


def fused_destinations(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Fuse `model`'s projections (on the meta device, so nothing is allocated) and return, per
    checkpoint name of a fused part, (fused parameter name, first row, rows).

    Read off the model rather than restated here: a fused Linear is the concatenation, in
    declaration order, of the Linears that its module's `fuse()` removed (model.py), so q, k, v
    (or gate, up) take consecutive row ranges. The exactness tests against transformers check it.
    """
    parts: dict[str, tuple[str, int, int]] = {}
    for prefix, module in list(model.named_modules()):
        if not isinstance(module, (Attention, MLP)):
            continue
        before = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
        module.fuse()
        after = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
        removed = [n for n in before if n not in after]
        (fused,) = [n for n in after if n not in before]
        row = 0
        for name in removed:
            for kind in ("weight", "bias"):
                if getattr(before[name], kind) is not None:
                    parts[f"{prefix}.{name}.{kind}"] = (f"{prefix}.{fused}.{kind}", row, before[name].out_features)
            row += before[name].out_features
        if row != after[fused].out_features:
            raise RuntimeError(f"{prefix}.{fused}: fused rows {after[fused].out_features} != parts {row}")
    return parts


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give every meta parameter real (uninitialised) storage, once per parameter object, so tied
    weights stay tied and are allocated once."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device))
                module._parameters[name] = made[id(p)]


@torch.no_grad()
def stream_weights(headers: dict[Path, dict[str, TensorInfo]], destinations: dict[str, Destination]) -> None:
    """Copy every checkpoint tensor named in `destinations` into its place, a bounded chunk of
    rows at a time (safetensors_io.py: no file mapped, no whole tensor in flight); the copy casts
    to the parameter's dtype and moves it to its device."""
    for path, tensors in headers.items():
        with ChunkedReader(path) as reader:
            for name, info in tensors.items():
                dest = destinations.get(name)
                if dest is None:
                    continue
                target = dest.param.narrow(0, dest.start, dest.rows)
                src = dest.source
                try:
                    if src is None:
                        reader.copy_into(info, target)
                    else:
                        reader.copy_into(info, target, src.dim, src.start, src.length)
                except SafetensorsError as exc:
                    raise ModelConfigError(str(exc)) from None


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "auto",
               shard: TensorShard | None = None) -> CausalLM:
    """The model in `model_dir`; with `shard`, only that tensor-parallel rank's part of it."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    headers = {path: read_header(path) for path in safetensors_files(model_dir)}  # read once
    present = {n for tensors in headers.values() for n in tensors if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")
    elif "lm_head.weight" not in present:
        raise ModelConfigError(f"{model_dir}: untied embeddings but no lm_head.weight in the checkpoint")
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {n for n, _ in model.named_parameters()}  # tied lm_head is not listed twice
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        raise ModelConfigError(
            f"{model_dir}: checkpoint does not match a {cfg.architecture} of this config "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    sources: dict[str, SourceSlice | None] = dict.fromkeys(expected)
    if shard is not None:
        model, sources = shard_model(cfg, shard)
    parts = fused_destinations(model.eval())
    materialize(model, dt, dev)
    params = dict(model.named_parameters())
    destinations = {}
    for name, source in sources.items():
        fused, start, rows = parts.get(name, (name, 0, None))
        param = params[fused]
        destinations[name] = Destination(param, start, param.shape[0] if rows is None else rows, source)
    stream_weights(headers, destinations)
    # Buffers built under the meta device hold no data: derive the rope frequencies for real.
    model.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(dev)
    n = sum(p.numel() for p in model.parameters())
    part = "" if shard is None else f", tensor-parallel rank {shard.rank} of {shard.world}"
    log.info("loaded %s (%s, %.1fM parameters%s) on %s in %s", model_dir, cfg.architecture, n / 1e6, part, dev, dt)
    return model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the assistant's turn, with
    `tools` (OpenAI function tools) offered to the template if given. The template holds every
    special token it needs, so the encoding adds none."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
