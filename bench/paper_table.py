"""The CTC-drafter paper's comparison table, on our model, in one run (issue 17).

For each drafter row (Medusa, Hydra, EAGLE-style without and with the CTC term, the parallel CTC
drafter with its static tree and with beam search, each alone and with prompt lookup): acceptance
length and speedup at batch 1 on MT-bench (both turns, the second prompt holding the model's own
first answer; overall and per category) and on GSM8K, against plain decoding in the same run.

Speedup is given two ways: the total-time ratio (plain seconds over all answers / the drafter's)
and the paper's per-question mean (the mean over questions of plain seconds / the drafter's
seconds for that question, all its turns). A second plain engine, the control, runs like every
other row: its ratio to the first is the run's noise, finer than which no speedup can be read.
Each question is answered by every engine in turn, the order rotating per question, so slow
drift of the machine hits all rows alike (as bench_engine.py's batch-1 section does). Outputs are
compared with plain decoding token for token (greedy): any difference is a bug and is reported.

Acceptance length = 1 + accepted draft tokens / drafting steps (bonus included, vLLM's meaning);
tokens/step counts every decode step, drafting or not (the governor may skip drafting).

`--smoke` runs the whole pipeline in seconds on random-init drafters of every kind (CI runs it,
tests/test_paper_table.py): figures meaningless, plumbing and losslessness checked.

Usage, from the repository root: python -m bench.paper_table [--help]   (make paper-table)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.bench_engine import machine
from drafter.evaluate import DEFAULT_PROMPTS, TurnRun, answer_questions, load_questions
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.factory import build_drafter
from server.engine.scheduler import SchedulerConfig, default_tree_nodes
from server.runtime.loader import load_model, load_tokenizer
from server.settings import HYBRID_SUFFIX

PLAIN, CONTROL = "plain", "plain (control)"
# label -> drafter spec: DIRECTORY[@static|@beam] (the CTC drafter's candidate search)
DEFAULT_DRAFTERS = {
    "Medusa": "models/demo-llama-medusa",
    "Hydra, 1,500 steps": "models/demo-llama-hydra",
    "EAGLE-style": "models/demo-llama-eagle",
    "EAGLE-style + CTC 0.01": "models/demo-llama-eagle-ctc",
    "EAGLE-style + CTC 0.01, 1,500 steps": "models/demo-llama-eagle-ctc-long",
    "CTC, static tree": "models/demo-llama-ctc@static",
    "CTC, beam search": "models/demo-llama-ctc@beam",
    "CTC, beam search, 1,500 steps, anchored frames": "models/demo-llama-ctc-1500@beam",
}
DATASETS = ("mt_bench", "gsm8k")


@dataclass(frozen=True)
class Row:
    label: str
    path: str | None  # drafter directory; None: plain decoding
    candidates: str | None = None  # CTC drafters: "static" or "beam" overrides the checkpoint's
    lookup: bool = False  # merged with prompt lookup (drafter/hybrid.py)

    @property
    def spec(self) -> str:
        return "none" if self.path is None else self.path + (HYBRID_SUFFIX if self.lookup else "")


def rows_for(drafters: dict[str, str]) -> list[Row]:
    """Plain, the control, then every drafter alone and with prompt lookup."""
    rows = [Row(PLAIN, None), Row(CONTROL, None)]
    for label, spec in drafters.items():
        path, _, candidates = spec.partition("@")
        if not Path(path, "config.json").is_file():
            raise SystemExit(f"{label}: no drafter at {path} (make paper-table trains the missing ones)")
        rows += [Row(label, path, candidates or None), Row(f"{label} + lookup", path, candidates or None, True)]
    return rows


def spread(questions: list[dict], n: int) -> list[dict]:
    """n questions taken round-robin over their categories (file order within each), so a short
    run still covers every MT-bench category."""
    groups: dict[str, list[dict]] = {}
    for q in questions:
        groups.setdefault(q["category"], []).append(q)
    order = [g[i] for i in range(max(map(len, groups.values()), default=0)) for g in groups.values() if i < len(g)]
    return order[:n]


def make_engine(row: Row, model, tokenizer, args: argparse.Namespace) -> LLMEngine:
    """A batch-1 engine with the server's default scheduler (governor as --governor says)."""
    sched = SchedulerConfig(max_batch_size=1, governor=args.governor == "on",
                            max_tree_nodes=default_tree_nodes(model.lm_head.weight.device))
    drafter = build_drafter(row.spec, model, 1, args.max_model_len)
    if row.candidates:
        learned = getattr(drafter, "learned", drafter)
        if learned.name != "ctc":
            raise SystemExit(f"{row.label}: @{row.candidates} applies to CTC drafters only")
        learned.model.config.candidates = row.candidates
    return LLMEngine(model, tokenizer, EngineConfig(max_model_len=args.max_model_len, scheduler=sched), drafter=drafter)


def run_interleaved(engines: dict[str, LLMEngine], tokenizer, questions: list[dict],
                    args: argparse.Namespace) -> dict[str, list[list[TurnRun]]]:
    """runs[engine][question][turn]: every question answered by every engine, order rotating."""
    for e in engines.values():  # untimed: first-call costs stay out of the figures
        answer_questions(e, tokenizer, questions[:1], min(16, args.max_tokens), args.max_model_len)
        e.forget_measurements()  # as the server does after its warm-up: the governor starts afresh
    names = list(engines)
    runs: dict[str, list[list[TurnRun]]] = {n: [] for n in names}
    for i, q in enumerate(questions):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(answer_questions(engines[name], tokenizer, [q], args.max_tokens, args.max_model_len)[0])
    return runs


def figures(plain: list[list[TurnRun]], runs: list[list[TurnRun]]) -> dict:
    """Acceptance and speedups of `runs` against `plain` over the same questions."""
    turns = [r for rs in runs for r in rs]
    spec, steps = sum(r.spec_steps for r in turns), sum(r.steps for r in turns)
    wall = [sum(r.wall_s for r in rs) for rs in runs]
    plain_wall = [sum(r.wall_s for r in rs) for rs in plain]
    return {
        "questions": len(runs), "answers": len(turns), "generated_tokens": sum(len(r.tokens) for r in turns),
        "acceptance_length": 1 + sum(r.accepted_tokens for r in turns) / spec if spec else None,
        "tokens_per_step": sum(max(len(r.tokens) - 1, 0) for r in turns) / steps if steps else None,
        "drafting_share": spec / steps if steps else None,  # steps that drafted (the governor may skip)
        "wall_s": sum(wall),
        "speedup_total": sum(plain_wall) / sum(wall),
        "speedup_per_question": statistics.fmean(p / w for p, w in zip(plain_wall, wall)),
    }


def measure(rows: list[Row], model, tokenizer, questions: list[dict], args: argparse.Namespace) -> dict:
    """Every row on `questions`: overall and per-category figures, and output mismatches."""
    engines = {r.label: make_engine(r, model, tokenizer, args) for r in rows}
    runs = run_interleaved(engines, tokenizer, questions, args)
    del engines
    cats = sorted({q["category"] for q in questions}, key=[q["category"] for q in questions].index)
    out: dict = {"categories": cats, "rows": {}, "mismatches": []}
    for label, rs in runs.items():
        entry = {"overall": figures(runs[PLAIN], rs)}
        if len(cats) > 1:
            for c in cats:
                idx = [i for i, q in enumerate(questions) if q["category"] == c]
                entry[c] = figures([runs[PLAIN][i] for i in idx], [rs[i] for i in idx])
        out["rows"][label] = entry
        for q, mine, ref in zip(questions, rs, runs[PLAIN]):
            if [r.tokens for r in mine] != [r.tokens for r in ref]:
                out["mismatches"].append({"row": label, "question": q["id"]})
    return out


def _f(x: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def markdown(res: dict) -> str:
    ds = res["datasets"]
    head = ["drafter"] + [f"{name} {col}" for name in ds for col in ("accept len", "speedup (total)", "speedup (per q)")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label in res["rows"]:
        cells = [label]
        for name in ds:
            f = ds[name]["rows"][label]["overall"]
            cells += [_f(f["acceptance_length"]), _f(f["speedup_total"], 2, "x"), _f(f["speedup_per_question"], 2, "x")]
        lines.append("| " + " | ".join(cells) + " |")
    mt = ds.get("mt_bench")
    if mt and len(mt["categories"]) > 1:
        cats = mt["categories"]
        lines += ["", "MT-bench by category (both turns): acceptance length / speedup (total-time ratio)", "",
                  "| drafter | " + " | ".join(cats) + " |", "|" + " --- |" * (len(cats) + 1)]
        for label, entry in mt["rows"].items():
            cells = [f"{_f(entry[c]['acceptance_length'])} / {_f(entry[c]['speedup_total'], 2, 'x')}" for c in cats]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    m = res["machine"]
    lines += ["", f"{res['started'][:16]}Z, {m['processor'] or m['platform']}, {m['cpus_usable']} CPUs usable, "
              f"torch {m['torch']} ({m['torch_threads']} threads), {m['device']} {m['dtype']}; "
              f"MT-bench {ds['mt_bench']['rows'][PLAIN]['overall']['questions'] if 'mt_bench' in ds else 0} questions, "
              f"GSM8K {ds['gsm8k']['rows'][PLAIN]['overall']['questions'] if 'gsm8k' in ds else 0}, "
              f"max {res['max_tokens']} new tokens per turn, governor {res['governor']}.",
              f"Command: `{res['command']}`"]
    bad = [(name, x) for name, d in ds.items() for x in d["mismatches"]]
    lines += [f"MISMATCH (a bug): {name} {x}" for name, x in bad]
    return "\n".join(lines)


def smoke_drafters(model, out_dir: Path) -> dict[str, str]:
    """Random-init drafters of every kind, saved under out_dir, in DEFAULT_DRAFTERS' rows."""
    from drafter.ctc import CTCDraftModel, CTCDrafterConfig
    from drafter.eagle import EagleConfig, EagleDraftModel
    from drafter.hydra import HydraConfig, HydraHeads
    from drafter.loading import save_drafter
    from drafter.medusa import MedusaConfig, MedusaHeads

    c = model.config
    built = {
        "medusa": MedusaHeads(MedusaConfig.for_base(c)),
        "hydra": HydraHeads(HydraConfig.for_base(c)),
        "eagle": EagleDraftModel(EagleConfig.for_base(c)),
        "eagle-ctc": EagleDraftModel(EagleConfig.for_base(c)),
        "eagle-ctc-long": EagleDraftModel(EagleConfig.for_base(c)),
        "ctc": CTCDraftModel(CTCDrafterConfig.for_base(c)),
        "ctc-1500": CTCDraftModel(CTCDrafterConfig.for_base(c)),
    }
    for name, m in built.items():
        save_drafter(m, out_dir / name)
    return {label: str(out_dir / Path(spec).name.removeprefix("demo-llama-")) for label, spec in DEFAULT_DRAFTERS.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="models/demo-llama", help="base model directory")
    p.add_argument("--drafter", action="append", metavar="LABEL=DIR[@static|@beam]",
                   help="a table row (repeatable); default: the shipped drafters of every kind")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="eval_prompts.jsonl")
    p.add_argument("--mt-bench", type=int, default=24, help="MT-bench questions (two turns each)")
    p.add_argument("--gsm8k", type=int, default=40, help="GSM8K questions")
    p.add_argument("--max-tokens", type=int, default=192, help="max new tokens per turn")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--governor", choices=["on", "off"], default="on" if SchedulerConfig.governor else "off",
                   help="the speculation governor (on: the server's default)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--smoke", action="store_true", help="random drafters, 2 questions each, 8 tokens: seconds")
    p.add_argument("--out", type=Path, default=None,
                   help="write OUT.json and OUT.md; default bench/results/paper-table-<UTC timestamp>")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.mt_bench, args.gsm8k, args.max_tokens = 2, 2, 8
            drafters = smoke_drafters(model, Path(tmp))
        else:
            drafters = dict(d.split("=", 1) for d in args.drafter) if args.drafter else DEFAULT_DRAFTERS
        rows = rows_for(drafters)
        res: dict = {"command": shlex.join([Path(sys.executable).name, "-m", "bench.paper_table", *(argv or sys.argv[1:])]),
                     "started": datetime.now(timezone.utc).isoformat(), "machine": machine(model),
                     "max_tokens": args.max_tokens, "governor": args.governor, "drafters": drafters,
                     "rows": [r.label for r in rows], "datasets": {}}
        for name, n in zip(DATASETS, (args.mt_bench, args.gsm8k)):
            if n:
                questions = spread(load_questions(args.prompts, name), n)
                res["datasets"][name] = measure(rows, model, tokenizer, questions, args)
    res["finished"] = datetime.now(timezone.utc).isoformat()
    text = markdown(res)
    out = args.out or Path("bench/results") / f"paper-table-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out.with_suffix('.json')} and .md", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
