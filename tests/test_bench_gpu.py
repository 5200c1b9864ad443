"""bench/bench_gpu.py: a CPU smoke run on the tiny shape, the simulated-acceptance oracle, the no-GPU exit.

The smoke run also checks for free what the GPU run reports: our plain engine's greedy tokens equal
transformers' `generate` on the same weights (fp32 here, so exactly), and the speculative engines with the
oracle drafter emit the plain engine's tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_gpu
from drafter.base import ProposeRequest

TINY_ARGS = ["--shape", "tiny", "--device", "cpu", "--weights", "disk", "--prompt-len", "16", "--new-tokens", "12",
             "--tree-sizes", "4,8", "--concurrency", "1,2", "--runs", "1", "--warmup", "1", "--repeats", "2",
             "--copy-mib", "4", "--acceptance-length", "2.5"]


def test_tiny_run_reports_every_section(tmp_path, capsys, one_thread):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main([*TINY_ARGS, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("command", "date", "machine", "bandwidth", "acceptance", "shapes"):
        assert key in res
    assert {"device_name", "torch", "cuda", "transformers", "kernel_backend"} <= res["machine"].keys()
    assert res["acceptance"] == {"length": 2.5, "source": "--acceptance-length",
                                 "per_token_accept": pytest.approx(bench_gpu.per_token_accept(2.5, 6))}
    (shape,) = res["shapes"]
    for key in ("weight_bytes", "bytes_per_step", "bandwidth_limit_tokens_per_s", "plain", "transformers",
                "verify", "draft", "projection", "concurrency"):
        assert key in shape
    assert shape["plain"]["generated_tokens"] == 12 and shape["plain"]["share_of_limit"] > 0
    assert shape["matches_transformers"], (shape["plain"]["tokens"], shape["transformers"]["tokens"])
    assert [t["draft_nodes"] for t in shape["verify"]["trees"]] == [4, 8]
    assert shape["draft"]["frames_ms"] > 0 and shape["draft"]["propose_ms"] > 0
    assert [p["draft_nodes"] for p in shape["projection"]] == [4, 8]
    assert [c["concurrency"] for c in shape["concurrency"]] == [1, 2]
    for c in shape["concurrency"]:
        assert c["acceptance"] == "simulated" and not c["mismatches"]
        assert {"none", "oracle"} <= c["variants"].keys()
        assert c["variants"]["oracle"]["diverged_requests"] == 0  # the planted bigram keeps the oracle in step
    printed = capsys.readouterr().out
    assert "ACCEPTANCE IS SIMULATED" in printed and "PROJECTED" in printed and "| tiny |" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_big_shapes_without_cuda_exit_cleanly(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--shape", "llama2-7b,llama3-8b", "--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("tau", [1.0, 1.5, 3.0, 4.5, 7.0])
def test_per_token_accept_hits_the_target(tau):
    q = bench_gpu.per_token_accept(tau, 6)
    assert 1 + sum(q**k for k in range(1, 7)) == pytest.approx(min(tau, 7.0), abs=1e-6)


def test_oracle_drafts_the_reference_with_the_set_accuracy():
    ref = list(range(100, 140))
    for q, right in ((1.0, True), (0.0, False)):
        oracle = bench_gpu.OracleDrafter({"a": ref}, q, depth=4, vocab=1000, seed=0)
        oracle.start("a", [1, 2, 3])
        oracle.observe("a", [1, 2, 3], None)  # the prompt is in the cache; ref[0] is pending
        oracle.observe("a", ref[:5], None)  # five output tokens committed; ref[5] is pending
        tree = oracle.propose([ProposeRequest("a", ref[5], budget=10)])[0]
        assert tree.num_draft_tokens == 10 and tree.tokens[:1] == [ref[5]]
        assert (tree.tokens[1:5] == ref[6:10]) is right  # the chain
        wrong = [i for i in range(1, 11) if tree.tokens[i] != ref[5 + tree.depths[i]]]
        assert wrong == ([] if right else list(range(1, 5))) + list(range(5, 11))  # filler siblings are all wrong
        assert not oracle.diverged
    oracle.observe("a", [999], None)  # leaves the reference
    assert oracle.diverged == {"a"}


def test_bench_verify_cost_runs_and_reports_every_size(capsys):
    from bench import bench_verify_cost
    from tests.conftest import DEMO_MODEL

    bench_verify_cost.main(["--model", str(DEMO_MODEL), "--tree-sizes", "1,4", "--repeats", "1", "--inner", "1",
                            "--drafters", f"ngram,{DEMO_MODEL.parent / 'demo-llama-ctc'}"])
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 4 |" in out and out.count("propose of") == 2
