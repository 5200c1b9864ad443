"""Shared fixtures: tiny random-init checkpoints of each supported family, written to disk as
real Hugging Face directories (config.json + safetensors) and loaded back through our loader."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels can only run under its interpreter, which Triton reads once, at its
# first import: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests load models from local directories only and must never wait on the Hub. huggingface_hub
# also reads this once, at its import, so it is set here, before any test module imports it: set
# in a test module it would take effect only when that module happens to be imported first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    # transformers initialises from the global RNG: seed it here, and restore it afterwards so
    # that no later test draws different numbers depending on whether this ran before it.
    with torch.random.fork_rng(devices=[]):
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


@pytest.fixture
def one_thread():
    """One torch thread for this test, the previous count restored after it; also for tests of a
    main() that sets the thread count itself. Many tiny ops: one thread is fastest, and stays fast
    on a busy machine (2 threads: 4x slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Set by others, whatever the order: pytest names the running test; torch sets the inductor cache
# directory (to its fixed default) when torch._dynamo is first imported, lazily, by the first test
# that builds a model.
UNWATCHED_ENV = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def process_state() -> dict:
    """What one test can change for every test after it in this process (the RNGs are not here:
    pytest-randomly reseeds random and numpy before each test, not torch, so no test's outcome may
    depend on the RNG state it starts with: tests that need given numbers seed a generator)."""
    return {
        "environment": {k: v for k, v in os.environ.items() if k not in UNWATCHED_ENV},
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "working directory": os.getcwd(),
        "sys.path": list(sys.path),
        "engine worker threads": sorted(t.name for t in threading.enumerate() if t.name == "engine-worker"),
    }


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Fail a test that leaves process-wide state changed: the tests after it would then pass or
    fail depending on the order they run in (restore it in the test, e.g. with monkeypatch)."""
    before = process_state()
    yield
    after = process_state()
    env_before, env_after = before.pop("environment"), after.pop("environment")
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    changed |= {f"${name}": (env_before.get(name), env_after.get(name))
                for name in env_before.keys() | env_after.keys() if env_before.get(name) != env_after.get(name)}
    assert not changed, f"the test left process-wide state changed (before, after): {changed}"
