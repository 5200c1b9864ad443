"""Tensor parallelism at TP=2 on the CPU (gloo, two processes): exact against TP=1, and refusals.

This process is rank 0 and a spawned worker is rank 1, as under `ctc-serve --tensor-parallel-size 2`.
Random-init checkpoints of the Llama (llama3 rope scaling, two safetensors shards) and Qwen2 (q/k/v
bias, tied embeddings) families, written as real checkpoints. The logits of every forward mode of
tests/test_runtime.py (prefill, chunked prefill with batched decode of unequal lengths, tree
verification, commit of tree paths then decode) match TP=1's within fp32 round-off (the all-reduce
sums the heads' partial products in another order); the engine's speculative output equals its
plain output at TP=2, greedy (and transformers' greedy) and seeded sampling. Each test starts its
own worker (a few seconds), so the test order cannot multiply start-ups.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from drafter.ngram import NgramDrafter
from server.engine.types import FinishReason, SamplingParams
from server.runtime.batch import ForwardItem
from server.runtime.config import ModelConfig, ModelConfigError
from server.runtime.loader import load_model
from server.runtime.parallel.group import WorkerGroup
from server.runtime.parallel.shard import TensorShard, check_shardable
from tests.conftest import make_hf_model
from tests.test_engine import GREEDY, NoisyOracleDrafter, hf_greedy, make_engine, prompts_for, run_all
from tests.test_loader_memory import REPO, SLACK_BYTES, write_checkpoint
from tests.test_runtime import MAX_LEN, TREE_PARENTS, prefill, run

ATOL = 1e-5  # fp32: TP=2 sums two partial products per row-parallel layer, TP=1 one full one

pytestmark = pytest.mark.timeout(600)


def checkpoint(family: str, out: Path) -> Path:
    shard = "60KB" if family == "llama3" else "50MB"  # llama3: several files, as real checkpoints
    make_hf_model(family).save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    return out


@pytest.fixture
def tp2(request, tmp_path):
    """(TP=1 model, TP=2 rank-0 model) of `request.param`'s family; the worker stops afterwards."""
    path = checkpoint(request.param, tmp_path / request.param)
    group = WorkerGroup(path, "float32", "cpu", 2)
    try:
        yield load_model(path, dtype="float32", device="cpu"), group.load_model()
    finally:
        group.close()
    assert group.failure is None


def forward_modes(model) -> list[torch.Tensor]:
    """The logits of test_runtime's forward modes, in order, on one model (the same inputs for every
    model: every random draw comes from seeded generators)."""
    out = []
    g = torch.Generator().manual_seed(2)
    cache = model.make_cache(4, MAX_LEN)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (40, 7, 19, 2)]
    slots, logits = prefill(model, cache, prompts[:1])  # one long prefill
    out += logits
    slots += [cache.allocate() for _ in prompts[1:]]
    for lo, hi in ((0, 5), (5, 100)):  # chunked prefill, three sequences of unequal lengths per forward
        items = [ForwardItem(s, cache.lengths[s], p[lo:hi]) for s, p in zip(slots[1:], prompts[1:]) if p[lo:hi]]
        out += run(model, cache, items)
        for it in items:
            cache.advance(it.slot, len(it.tokens))
    trees = [torch.randint(0, 160, (len(TREE_PARENTS),), generator=g).tolist() for _ in slots]
    out += run(model, cache, [ForwardItem(s, cache.lengths[s], t, TREE_PARENTS) for s, t in zip(slots, trees)])
    cache.commit_paths(slots, [[0, 1, 3], [0, 2, 5], [0], [0, 8]])  # moves on every rank, or none
    for _ in range(4):  # batched decode after the commit: reads the moved K/V
        nxt = [int(torch.randint(0, 160, (1,), generator=g)) for _ in slots]
        out += run(model, cache, [ForwardItem(s, cache.lengths[s], [t]) for s, t in zip(slots, nxt)])
        for s in slots:
            cache.advance(s, 1)
    return out


@pytest.mark.parametrize("tp2", ["llama3", "qwen2"], indirect=True)
def test_tp2_logits_match_tp1_in_every_forward_mode(tp2):
    tp1_model, tp2_model = tp2
    expected, got = forward_modes(tp1_model), forward_modes(tp2_model)
    assert len(got) == len(expected) == 1 + (3 + 2) + 4 + 4 * 4  # prefill, two chunks, trees, decodes
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"forward {i}")


@pytest.mark.parametrize("tp2", ["llama3"], indirect=True)
def test_tp2_speculative_equals_plain_greedy_and_seeded(tp2):
    _, model = tp2
    hf = make_hf_model("llama3")
    prompts = prompts_for(6, seed=11)
    refs = {f"r{i}": hf_greedy(hf, p, 24) for i, p in enumerate(prompts)}
    for drafter in (None, NgramDrafter(), NoisyOracleDrafter(refs, 160)):
        engine = make_engine(model, drafter, batch=4, prefill_chunk=16, max_tree_nodes=6)
        out = run_all(engine, {rid: (p, GREEDY) for rid, p in zip(refs, prompts)})
        for rid, ref in refs.items():
            assert out[rid]["tokens"] == ref, (drafter, rid)
            assert out[rid]["finish"] is FinishReason.LENGTH
        if isinstance(drafter, NoisyOracleDrafter):
            assert 0 < sum(o["accepted"] for o in out.values()) < sum(o["drafts"] for o in out.values())

    params = [SamplingParams(max_tokens=20, temperature=t, top_p=p, top_k=k, seed=100 + i, ignore_eos=True)
              for i, (t, p, k) in enumerate([(0.7, 1.0, None), (1.0, 0.9, None), (1.3, 1.0, 20), (0.5, 0.8, 10)])]
    reqs = {f"s{i}": (p, sp) for i, (p, sp) in enumerate(zip(prompts_for(4, seed=12), params))}
    plain = run_all(make_engine(model, None), reqs)
    drafts = {rid: o["tokens"] for rid, o in plain.items()}
    spec = run_all(make_engine(model, NoisyOracleDrafter(drafts, 160, seed=3), max_tree_nodes=5), reqs)
    assert {rid: o["tokens"] for rid, o in spec.items()} == drafts
    assert sum(o["accepted"] for o in spec.values()) > 0


def test_models_that_do_not_split_are_refused_in_one_line(tmp_path):
    path = checkpoint("qwen2", tmp_path / "qwen2")  # 4 heads, 2 kv heads, intermediate 96
    one_line = (r"^--tensor-parallel-size 4 does not divide this model's 2 key/value heads "
                r"\(num_key_value_heads\); choose a size that divides 2$")
    with pytest.raises(ModelConfigError, match=one_line):
        WorkerGroup(path, "float32", "cpu", 4)  # refused before any worker starts
    cfg = ModelConfig.from_dir(path)
    with pytest.raises(ModelConfigError, match="does not divide this model's 97 MLP columns"):
        check_shardable(dataclasses.replace(cfg, intermediate_size=97), 2)
    with pytest.raises(ModelConfigError, match="does not divide this model's 6 attention heads"):
        check_shardable(dataclasses.replace(cfg, num_heads=6, num_kv_heads=2), 4)
    check_shardable(cfg, 2)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_each_rank_loads_its_slices_and_nothing_else(family, tmp_path):
    """No process group is needed to load: each rank's weights are compared with the full model's."""
    path = checkpoint(family, tmp_path / family)
    full = load_model(path, dtype="float32", device="cpu")
    ranks = [load_model(path, dtype="float32", device="cpu", shard=TensorShard(r, 2)) for r in range(2)]
    cfg, hd = full.config, full.config.head_dim
    assert ranks[1].model.embed_tokens is None and ranks[1].lm_head is None  # the vocabulary is rank 0's
    torch.testing.assert_close(ranks[0].lm_head.weight, full.lm_head.weight, atol=0, rtol=0)
    q, kv, inter = cfg.num_heads // 2 * hd, cfg.num_kv_heads // 2 * hd, cfg.intermediate_size // 2
    for i, layer in enumerate(full.model.layers):
        wq, wk, wv = layer.self_attn.qkv_proj.weight.split([2 * q, 2 * kv, 2 * kv])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        for r, rank in enumerate(ranks):
            mine = rank.model.layers[i]
            rows = torch.cat([wq[r * q : (r + 1) * q], wk[r * kv : (r + 1) * kv], wv[r * kv : (r + 1) * kv]])
            assert torch.equal(mine.self_attn.qkv_proj.weight, rows)
            assert torch.equal(mine.self_attn.o_proj.weight, layer.self_attn.o_proj.weight[:, r * q : (r + 1) * q])
            assert torch.equal(mine.mlp.gate_up_proj.weight,
                               torch.cat([gate[r * inter : (r + 1) * inter], up[r * inter : (r + 1) * inter]]))
            assert torch.equal(mine.mlp.down_proj.weight, layer.mlp.down_proj.weight[:, r * inter : (r + 1) * inter])
            if cfg.qkv_bias:
                bq, bk, bv = layer.self_attn.qkv_proj.bias.split([2 * q, 2 * kv, 2 * kv])
                assert torch.equal(mine.self_attn.qkv_proj.bias,
                                   torch.cat([bq[r * q : (r + 1) * q], bk[r * kv : (r + 1) * kv],
                                              bv[r * kv : (r + 1) * kv]]))
    layer_params = sum(p.numel() for p in full.model.layers.parameters())
    norms = sum(p.numel() for n, p in full.model.layers.named_parameters() if "norm" in n)
    assert sum(p.numel() for p in ranks[1].model.layers.parameters()) == (layer_params - norms) // 2 + norms


PROBE = r"""
import json, sys
from server.runtime.loader import load_model
from server.runtime.parallel.shard import TensorShard

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

load_model(sys.argv[1], dtype="float32", device="cpu", shard=TensorShard(1, 2))  # warm-up: lazy imports
base = status_kib("VmRSS:")
model = load_model(sys.argv[2], dtype="float32", device="cpu", shard=TensorShard(1, 2))
print(json.dumps({"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "peak": (status_kib("VmHWM:") - base) * 1024}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_a_worker_rank_loads_half_the_layers_and_peaks_within_1_1x_of_them(tmp_path):
    """Rank 1 of 2 of test_loader_memory's ~160 MB checkpoint: it ends with half of every layer
    (no vocabulary) and reads only its slices (safetensors get_slice), never a whole tensor."""
    write_checkpoint(tmp_path / "tiny", hidden=128, inter=256, layers=1)
    write_checkpoint(tmp_path / "big", hidden=640, inter=1792, layers=8)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tiny"), str(tmp_path / "big")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    weights, peak = result["weights"], result["peak"]
    raw = json.loads((tmp_path / "big" / "config.json").read_text())
    h, i, kv = raw["hidden_size"], raw["intermediate_size"], raw["num_key_value_heads"] * 64
    per_layer = (2 * h * h + 2 * h * kv + 3 * h * i) // 2 + 2 * h  # half of q, o, k, v, MLP; both norms
    assert weights == 4 * (raw["num_hidden_layers"] * per_layer + h)  # float32; plus the final norm
    print(f"rank 1 of 2: {weights / 2**20:.0f} MiB, loader peak {peak / weights:.3f}x")
    assert peak <= 1.1 * weights + SLACK_BYTES, f"peak {peak / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"


def _sleep_a_minute() -> None:
    time.sleep(60)


def test_a_dead_worker_is_named_with_its_exit_code_when_two_threads_notice_at_once():
    """The watchdog and a failed collective both ask which worker died. Without one lock around
    reaping, the second waitpid sees ECHILD and the reason reads "exited with code None" (about 4 in
    100 before the fix). Fork children stand in for the workers: only the reaping is under test."""
    ctx = mp.get_context("fork")
    for _ in range(50):
        group = object.__new__(WorkerGroup)  # no workers, no process group: just the reaping state
        worker = ctx.Process(target=_sleep_a_minute, daemon=True)
        worker.start()
        group._procs, group._reap_lock = [worker], threading.Lock()
        reasons: list[str | None] = []
        start = threading.Barrier(3)

        def notice() -> None:
            start.wait()
            reasons.append(group._dead_worker())

        threads = [threading.Thread(target=notice) for _ in range(2)]
        for thread in threads:
            thread.start()
        start.wait()
        os.kill(worker.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        assert reasons == [f"tensor-parallel worker rank 1 (pid {worker.pid}) exited with code -9"] * 2
