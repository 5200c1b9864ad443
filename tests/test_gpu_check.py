"""bench/gpu_check.py (`make gpu-check`): its CPU smoke mode runs every section at tiny shapes.

In a subprocess, so that the Triton kernels run in Triton's interpreter whatever this test process
imported before (kernels/backend.py: the mode is fixed at triton's first import). The figures are
meaningless on the CPU; what is checked is that each section produces its results and that the
checks it makes for free hold: kernel parity, graphs (padded buckets here) = eager = transformers
token for token, and speculative = plain on the demo model (fp32, so exactly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_smoke_mode_runs_every_section(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["total_s"] > 0
    kernels = res["kernels"]
    if "skipped" in kernels:
        pytest.skip(kernels["skipped"])
    assert kernels["interpreted"] and len(kernels["rows"]) >= 4 and all(r["ok"] for r in kernels["rows"])
    assert any("splits=" in r["case"] for r in kernels["rows"])
    decode = res["decode"]
    assert decode["graphs_equal_eager"] and decode["eager_equals_transformers"]
    assert decode["eager"]["share_of_limit"] > 0 and decode["transformers"]["decode_tokens_per_s"] > 0
    verify = res["verify"]
    assert not verify["graphs_captured"]  # the CPU runs the padded buckets eagerly
    for mode in ("eager", "graphs"):
        assert [t["draft_nodes"] for t in verify["modes"][mode]["trees"]] == [1, 2, 4, 8]
    demo = res["demo"]
    if "skipped" not in demo:
        assert demo["identical_outputs"] == demo["prompts"] == 2
    for heading in ("Kernel parity", "Plain decode", "Verify-step cost", "Demo model"):
        assert heading in res["markdown"] and heading in proc.stdout
