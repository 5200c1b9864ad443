"""The CTC-weight study (issue 17, point 2): what the CTC loss term buys, at equal budget per family.

Two families of rows, every row of a family trained on the same self-distilled data with the same
steps, conversations per step and seed, then measured by `ctc-drafter eval` on the same held-out
GSM8K prompts (acceptance length tau, batch 16, tree budget 16):

- the EAGLE-style drafter (`--kind eagle`) with the CTC-drafter authors' auxiliary CTC loss over
  its drafted positions at `--ctc-weight W` (W = 0: EAGLE-1's loss alone);
- the parallel CTC drafter (`--kind ctc --layers 2`), CTC alone (A = 0) and plus the frame j ->
  label j cross-entropy at `--aux-weight A`.

Each step is `ctc-drafter distill | train | eval` run in this process (drafter/cli.py), printed
before it runs, and skipped when its output exists: an interrupted study resumes where it stopped
(training resumes from OUT/.train). Output directories name their budget (eagle-ctc0.01-200x4), so
a rerun at another budget trains anew. The table goes to WORK/table.md and WORK/table.json.

`--smoke`: 6 conversations, 2 steps, 2 prompts of 8 tokens, in a temporary directory: plumbing
only, the figures mean nothing (tests/test_ctc_weight_study.py).

Usage, from the repository root: python -m bench.ctc_weight_study [--help]   (make ctc-weight-study)
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from drafter import cli


@dataclass(frozen=True)
class Row:
    family: str  # "eagle" (weight: --ctc-weight) or "ctc" (weight: --aux-weight)
    weight: float
    steps: int
    batch: int  # conversations per step
    seed: int = 0

    @property
    def name(self) -> str:
        tag = "eagle-ctc" if self.family == "eagle" else "ctc-aux"
        return f"{tag}{self.weight:g}-{self.steps}x{self.batch}" + (f"-seed{self.seed}" if self.seed else "")

    @property
    def label(self) -> str:
        if self.family == "eagle":
            return f"EAGLE-style, CTC weight {self.weight:g}"
        return "CTC alone" if self.weight == 0 else f"CTC + frame->label CE, weight {self.weight:g}"

    def train_flags(self) -> list[str]:
        if self.family == "eagle":
            return ["--kind", "eagle", "--ctc-weight", f"{self.weight:g}"]
        return ["--kind", "ctc", "--layers", "2", "--aux-weight", f"{self.weight:g}"]


def rows_for(args: argparse.Namespace) -> list[Row]:
    rows = [Row("eagle", w, args.steps, args.batch, args.seed) for w in args.eagle_weights]
    return rows + [Row("ctc", a, args.ctc_steps, args.batch, args.seed) for a in args.ctc_aux_weights]


def distill_argv(args: argparse.Namespace, data: Path) -> list[str]:
    return ["distill", "--out", str(data), "--regenerate", "--max-conversations", str(args.conversations),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "48", "--threads", str(args.threads)]


def train_argv(row: Row, args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(row.steps),
            "--conversations-per-step", str(row.batch), "--seed", str(row.seed), "--threads", str(args.threads),
            *row.train_flags()]


def eval_argv(args: argparse.Namespace, drafter: Path, out: Path) -> list[str]:
    return ["eval", "--drafter", str(drafter), "--num-prompts", str(args.num_prompts), "--max-tokens",
            str(args.max_tokens), "--threads", str(args.threads), "--out", str(out)]


def run(argv: list[str], done: Path, commands: list[str]) -> None:
    """`ctc-drafter ARGV` unless `done` exists; the command is recorded either way."""
    commands.append(shlex.join(["ctc-drafter", *argv]))
    if done.exists():
        print(f"= {commands[-1]}  (done: {done})", flush=True)
        return
    print(f"+ {commands[-1]}", flush=True)
    if cli.main(argv) != 0:
        raise SystemExit(f"failed: {commands[-1]}")


def collect(row: Row, out: Path, eval_json: Path) -> dict:
    """One table row from the drafter's config.json (its training) and its eval JSON."""
    training = json.loads((out / "config.json").read_text())["training"]
    (figures,) = json.loads(eval_json.read_text()).values()
    final = training["final"]
    return {"label": row.label, "family": row.family, "weight": row.weight, "steps": training["steps"],
            "batch": training["conversations_per_step"], "seed": training["seed"],
            "train_minutes": final.get("train_minutes_this_run"), "acc1": final.get("acc1"),
            "match": final.get("match"), "tau": figures["tau"], "tau_spec": figures["tau_spec"],
            "draft_per_verify": figures["propose_share_of_verify"], "drafter": str(out)}


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: list[dict]) -> str:
    """The study's table: one line per row, families in order, as BENCHMARKS.md prints it."""
    lines = ["| drafter | loss | training | train minutes | last batch acc1 / match | τ | τ_spec | draft/verify |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        kind = "EAGLE-style" if r["family"] == "eagle" else "CTC (parallel)"
        loss = r["label"].split(", ", 1)[1] if r["family"] == "eagle" else r["label"]
        training = f"{r['steps']} x {r['batch']}" + (f", seed {r['seed']}" if r["seed"] else "")
        lines.append(f"| {kind} | {loss} | {training} | {_f(r['train_minutes'], 1)} "
                     f"| {_f(r['acc1'])} / {_f(r['match'])} | {_f(r['tau'])} | {_f(r['tau_spec'])} "
                     f"| {_f(r['draft_per_verify'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("models/.build/study"), help="data, drafters, evals, table")
    p.add_argument("--conversations", type=int, default=600, help="self-distilled training conversations")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest regenerated turn")
    p.add_argument("--steps", type=int, default=600, help="EAGLE-style rows' training steps")
    p.add_argument("--ctc-steps", type=int, default=600, help="CTC rows' training steps (all-blank drafts at 80)")
    p.add_argument("--batch", type=int, default=4, help="conversations per step, every row")
    p.add_argument("--seed", type=int, default=0, help="every row's training seed (another seed: the spread)")
    p.add_argument("--eagle-weights", type=float, nargs="*", default=[0, 0.001, 0.01, 0.1], help="--ctc-weight values")
    p.add_argument("--ctc-aux-weights", type=float, nargs="*", default=[0, 0.1, 0.5, 1.0], help="--aux-weight values")
    p.add_argument("--num-prompts", type=int, default=20, help="held-out GSM8K prompts")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every step")
    p.add_argument("--table", type=Path, default=None, help="write TABLE.md and TABLE.json; default WORK/table")
    p.add_argument("--smoke", action="store_true", help="tiny data, 2 steps, 2 prompts, in a temp dir: seconds")
    return p.parse_args(argv)


def study(args: argparse.Namespace) -> dict:
    work = args.work
    data = work / f"regen-{args.conversations}"
    commands: list[str] = []
    run(distill_argv(args, data), data / "meta.json", commands)
    results = []
    for row in rows_for(args):
        out, eval_json = work / row.name, work / "eval" / f"{row.name}.json"
        eval_json.parent.mkdir(parents=True, exist_ok=True)
        run(train_argv(row, args, data, out), out / "model.safetensors", commands)
        run(eval_argv(args, out, eval_json), eval_json, commands)
        results.append(collect(row, out, eval_json))
    res = {"finished": datetime.now(timezone.utc).isoformat(), "commands": commands, "rows": results}
    table = args.table or work / "table"
    table.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    table.with_suffix(".md").write_text(markdown(results) + "\n")
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.smoke:
        args.work.mkdir(parents=True, exist_ok=True)
        res = study(args)
    else:
        args.conversations, args.max_new_tokens, args.steps, args.ctc_steps = 6, 8, 2, 2
        args.batch, args.num_prompts, args.max_tokens = 2, 2, 8
        args.eagle_weights, args.ctc_aux_weights = args.eagle_weights[:1] + args.eagle_weights[-1:], [0, 1.0]
        with tempfile.TemporaryDirectory() as tmp:
            args.work, args.table = Path(tmp), None
            res = study(args)
    print(markdown(res["rows"]))
    return res


if __name__ == "__main__":
    main()
