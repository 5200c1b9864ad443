"""bench/bench_engine.py end to end on the demo model, tiny sizes: every section, the control, exactness."""

import json

import pytest

from bench import bench_engine


def test_tiny_run_reports_every_section_and_the_control(tmp_path, capsys, one_thread):
    out = tmp_path / "engine.json"
    bench_engine.main(["--drafters", "ngram", "--num-prompts", "2", "--max-tokens", "12", "--temperatures", "0,0.7",
                       "--concurrency", "2", "--requests-per-slot", "1", "--concurrency-repeats", "1",
                       "--tree-budgets", "4", "--control", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [b["temperature"] for b in res["batch1"]] == [0.0, 0.7]
    for section in [*res["batch1"], *res["concurrency"]]:
        assert list(section["variants"]) == ["none", "none (control)", "ngram"]
        assert section["mismatches"] == []  # speculation and a second plain engine both match plain decoding
        for v in section["variants"].values():
            assert v["generated_tokens"] > 0 and v["speedup"] > 0
    assert set(res["tree_sweep"]["variants"]) == {"none", "ngram@4"}
    for b in res["batch1"]:
        for name, v in b["variants"].items():
            ph = v["phase_ms_per_step"]  # the phases of a decode step lie within its wall time
            assert set(ph) == set(bench_engine.PHASES) and all(x >= 0 for x in ph.values())
            assert ph["verify"] > 0 and sum(ph.values()) <= v["decode_ms_per_step"]
            if name != "ngram":
                assert ph["propose"] < ph["verify"]  # plain decoding drafts nothing
    text = capsys.readouterr().out
    assert "**Batch 1**" in text and "Control (a second plain engine):" in text
    assert "**Batch 1: where a decode step's time goes**" in text
    assert "Outputs identical to plain decoding: yes" in text


def test_prefill_itl_section_counts_the_steps_the_long_prompt_shares(tmp_path, capsys, one_thread):
    out = tmp_path / "engine.json"
    bench_engine.main(["--drafters", "none", "--num-prompts", "1", "--max-tokens", "24", "--temperatures", "0",
                       "--concurrency", "", "--itl-prefill", "64", "--prefill-chunk", "16", "--threads", "1",
                       "--out", str(out)])
    itl = json.loads(out.read_text())["prefill_itl"]
    assert itl["prompt_tokens"] == 64 and itl["prefill_chunk"] == 16
    v = itl["variants"]["none"]
    assert v["prefill_steps"] == 64 // 16  # one stream token per step, each step one 16-token chunk
    assert v["chunks"] == [16] * 4
    assert v["stream_gaps"] == 24 - 1
    assert v["max_itl_during_prefill_ms"] > 0 and v["ratio"] > 0
    assert "**Inter-token latency while a 64-token prompt" in capsys.readouterr().out


@pytest.mark.parametrize("ratio", ["0", "2"])
def test_prefill_itl_chunks_follow_the_step_ratio_rule(tmp_path, ratio, one_thread):
    """Ratio 0: every step the full --prefill-chunk. Ratio 2: chunks sized from measured step costs,
    which this test cannot know (a timing), only that they stay within [min_prefill_chunk, chunk]."""
    out = tmp_path / "engine.json"
    bench_engine.main(["--drafters", "none", "--num-prompts", "1", "--max-tokens", "32", "--temperatures", "0",
                       "--concurrency", "", "--itl-prefill", "96", "--prefill-chunk", "64", "--threads", "1",
                       "--prefill-step-ratio", ratio, "--out", str(out)])
    chunks = json.loads(out.read_text())["prefill_itl"]["variants"]["none"]["chunks"]
    assert sum(chunks) == 96
    if ratio == "0":
        assert chunks == [64, 32]
    else:
        assert all(16 <= c <= 64 for c in chunks[:-1]) and 1 <= chunks[-1] <= 64


def batch1(tmp_path, drafters: str, *flags: str) -> dict:
    """The batch-1 section of a one-prompt, 8-token run of `drafters` with `flags`."""
    out = tmp_path / "engine.json"
    bench_engine.main(["--drafters", drafters, *flags, "--num-prompts", "1", "--max-tokens", "8", "--temperatures", "0",
                       "--concurrency", "", "--threads", "1", "--out", str(out)])
    (b,) = json.loads(out.read_text())["batch1"]
    return b


def test_drafter_dtypes_run_as_variants_and_bad_names_are_refused(tmp_path, one_thread):
    b = batch1(tmp_path, "models/demo-llama-ctc", "--drafter-dtype", "float32,bfloat16")
    assert list(b["variants"]) == ["none", "demo-llama-ctc [float32]", "demo-llama-ctc [bfloat16]"]
    assert b["mismatches"] == []  # the drafter's dtype never changes the output
    with pytest.raises(SystemExit):
        bench_engine.parse_args(["--drafter-dtype", "auto,bf16"])


def test_governor_margins_run_as_variants_of_the_governed_engines_only(tmp_path, one_thread):
    b = batch1(tmp_path, "ngram", "--governor", "both", "--governor-larger-margin", "0,0.1")
    assert list(b["variants"]) == ["none", "ngram [larger margin 0]", "ngram [larger margin 0.1]",
                                   "ngram (no governor)"]
    assert b["mismatches"] == []
    # What each engine played, as shares of its decode steps: plain only without a drafter, every
    # step the largest tree without a governor (the server's default on a CPU: 8 nodes), and shares
    # summing to 1 with one.
    v = b["variants"]
    assert v["none"]["choices"] == {"plain": 1.0} and v["ngram (no governor)"]["choices"] == {"8": 1.0}
    assert sum(v["ngram [larger margin 0.1]"]["choices"].values()) == pytest.approx(1.0)


def test_governor_choices_from_runs_as_variants_and_reaches_the_scheduler(tmp_path, one_thread):
    b = batch1(tmp_path, "ngram", "--governor-choices-from", "1,2")
    assert list(b["variants"]) == ["none", "ngram [all sizes from batch 1]", "ngram [all sizes from batch 2]"]
    assert b["mismatches"] == []
    # from batch 2: at batch 1 only the largest tree (8 on a CPU) or plain decoding ever plays (ngram has one tier)
    assert set(b["variants"]["ngram [all sizes from batch 2]"]["choices"]) <= {"8", "plain"}
