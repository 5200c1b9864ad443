"""The CTC-weight study's rows, commands and table (bench/ctc_weight_study.py); its smoke run."""

from __future__ import annotations

import json

import pytest

from bench import ctc_weight_study as study


def test_rows_share_data_steps_batch_and_seed_within_a_family():
    args = study.parse_args(["--steps", "120", "--ctc-steps", "700", "--batch", "4", "--seed", "3"])
    rows = study.rows_for(args)
    assert [(r.family, r.weight) for r in rows] == [("eagle", 0), ("eagle", 0.001), ("eagle", 0.01), ("eagle", 0.1),
                                                    ("ctc", 0), ("ctc", 0.1), ("ctc", 0.5), ("ctc", 1.0)]
    assert len({r.name for r in rows}) == len(rows)
    data, out = study.Path("D"), study.Path("O")
    argvs = [study.train_argv(r, args, data, out) for r in rows]
    for r, argv in zip(rows, argvs):
        flags = dict(zip(argv[1::2], argv[2::2]))
        assert flags["--data"] == "D" and flags["--conversations-per-step"] == "4" and flags["--seed"] == "3"
        assert flags["--steps"] == ("120" if r.family == "eagle" else "700")
        assert flags["--ctc-weight" if r.family == "eagle" else "--aux-weight"] == f"{r.weight:g}"
    # Another seed trains anew, in its own directories.
    again = study.rows_for(study.parse_args(["--steps", "120", "--ctc-steps", "700", "--batch", "4", "--seed", "4"]))
    assert not {r.name for r in rows} & {r.name for r in again}
    # The weight is the only difference between the rows of a family.
    eagle = [a for r, a in zip(rows, argvs) if r.family == "eagle"]
    assert all(len(a) == len(eagle[0]) and sum(x != y for x, y in zip(a, eagle[0])) <= 1 for a in eagle)


def _fake_row(tmp_path, row, tau, minutes):
    out = tmp_path / row.name
    out.mkdir()
    training = {"steps": row.steps, "conversations_per_step": row.batch, "seed": row.seed,
                "final": {"acc1": 0.4, "match": 0.7, "train_minutes_this_run": minutes}}
    (out / "config.json").write_text(json.dumps({"kind": row.family, "training": training}))
    ev = tmp_path / f"{row.name}.json"
    ev.write_text(json.dumps({str(out): {"tau": tau, "tau_spec": tau + 0.01, "propose_share_of_verify": 0.8}}))
    return study.collect(row, out, ev)


def test_table_has_one_line_per_row_with_its_figures(tmp_path):
    rows = [study.Row("eagle", 0.0, 200, 4), study.Row("eagle", 0.01, 200, 4), study.Row("ctc", 0.0, 600, 4),
            study.Row("ctc", 0.5, 600, 4, seed=1)]
    results = [_fake_row(tmp_path, r, 1.8 + i / 10, 10.0 + i) for i, r in enumerate(rows)]
    lines = study.markdown(results).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("| EAGLE-style | CTC weight 0 | 200 x 4 | 10.0 | 0.40 / 0.70 | 1.80 | 1.81 | 0.80 |")
    assert "| EAGLE-style | CTC weight 0.01 | 200 x 4 | 11.0 |" in lines[3]
    assert lines[4].startswith("| CTC (parallel) | CTC alone | 600 x 4 | 12.0 |") and "| 2.00 |" in lines[4]
    assert "CTC + frame->label CE, weight 0.5 | 600 x 4, seed 1 | 13.0 |" in lines[5]


@pytest.mark.slow
def test_smoke_run_trains_and_evaluates_every_row(one_thread, capsys):
    res = study.main(["--smoke"])
    assert [r["label"] for r in res["rows"]] == ["EAGLE-style, CTC weight 0", "EAGLE-style, CTC weight 0.1",
                                                 "CTC alone", "CTC + frame->label CE, weight 1"]
    assert all(r["steps"] == 2 and r["tau"] >= 1.0 for r in res["rows"])
    assert sum(c.startswith("ctc-drafter train") for c in res["commands"]) == 4
    assert "| EAGLE-style | CTC weight 0.1 | 2 x 2 |" in capsys.readouterr().out
