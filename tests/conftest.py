"""Shared fixtures: tiny random-init checkpoints of each supported family, written to disk as
real Hugging Face directories (config.json + safetensors) and loaded back through our loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels can only run under its interpreter, which Triton reads once, at its
# first import: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "demo-llama"
SHARED_DATA = REPO.parent / "shared" / "data"

# Small enough for fast CPU tests, big enough to exercise GQA (4 query heads per 2 kv heads),
# llama3 rope scaling (original context 32 < test lengths), biases and tied embeddings.
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def make_hf_model(family: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    """(family, transformers model, checkpoint dir). The llama3 one is written in two shards."""
    family = request.param
    model = make_hf_model(family)
    out = tmp_path_factory.mktemp(family)
    shard = "60KB" if family == "llama3" else "50MB"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    return family, model, out


@pytest.fixture
def anyio_backend() -> str:
    """The server runs on asyncio only (trio is installed too, and would double every async test)."""
    return "asyncio"


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI has 2 cores; tiny models run faster without thread fan-out.
    torch.set_num_threads(int(os.environ.get("CTC_TEST_THREADS", "2")))
