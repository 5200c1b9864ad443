"""`ctc-drafter`: build distillation data, train a drafter, measure its acceptance length.

    ctc-drafter distill --model models/demo-llama --out drafts/demo-data [--regenerate]
    ctc-drafter train   --model models/demo-llama --data drafts/demo-data --out models/demo-llama-ctc
    ctc-drafter eval    --model models/demo-llama --drafter models/demo-llama-ctc --drafter ngram

Many GPUs or processes: `torchrun --nproc-per-node 8 -m drafter.cli train ...` (DDP).
A 7-8B base model: `distill --hidden-states online` (token ids only), then `train --hidden-states
online --dtype bfloat16 --autocast bf16 --max-tokens-per-batch 16384` (README, "Large base models").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "corpus.jsonl"
DEMO_MODEL = REPO / "models" / "demo-llama"


def cmd_distill(args) -> None:
    import random

    from drafter.data import build_distilled, encode_conversation, load_corpus, perturb_numbers, regenerate, token_set
    from server.runtime.loader import load_model, load_tokenizer

    stored = args.hidden_states == "stored"
    # Online data needs the base model only to regenerate answers.
    model = load_model(args.model, dtype="float32", device=args.device) if stored or args.regenerate else None
    tok = load_tokenizer(args.model)
    rows = load_corpus(args.corpus)[args.skip_conversations :]
    rows = rows[: args.max_conversations]
    if not rows:
        raise ValueError(f"no training conversations left in {args.corpus} after skipping {args.skip_conversations}")
    convs = [r["messages"] for r in rows]
    if args.regenerate_temperature and not args.regenerate:
        raise SystemExit("--regenerate-temperature needs --regenerate")
    if args.perturb_numbers:
        if not args.regenerate:
            raise SystemExit("--perturb-numbers changes the questions, so it needs --regenerate for matching answers")
        rng = random.Random(0)
        convs = [perturb_numbers(c, rng) for c in convs]
    if args.regenerate:
        from server.engine.engine import EngineConfig, LLMEngine
        from server.engine.scheduler import SchedulerConfig

        engine = LLMEngine(model, tok, EngineConfig(max_model_len=args.max_len,
                                                    scheduler=SchedulerConfig(max_batch_size=args.batch_size)))
        convs = regenerate(engine, tok, convs, args.max_new_tokens, args.regenerate_temperature,
                           seed=args.skip_conversations)
    encoded = [encode_conversation(tok, c, args.max_len) for c in convs]
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(encoded), args.shard_size):
        part = encoded[k : k + args.shard_size]
        shard = build_distilled(model, part) if stored else token_set(part)
        shard.save(args.out / f"shard-{k // args.shard_size:04d}.safetensors")
    meta = {"model": str(args.model), "conversations": len(encoded), "hidden_states": args.hidden_states,
            "regenerated": args.regenerate,
            "perturbed_numbers": args.perturb_numbers, "skipped_conversations": args.skip_conversations,
            "regenerate_temperature": args.regenerate_temperature,
            "tokens": sum(len(e[0]) for e in encoded), "max_len": args.max_len}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logging.info("distilled %s", meta)


def rank_device(device: str) -> str:
    """Under torchrun on GPUs, this rank's own GPU, cuda:LOCAL_RANK (made the current device, which
    NCCL uses): on "cuda" alone every rank would load onto GPU 0, and NCCL refuses two ranks on one."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    torch.cuda.set_device(int(local_rank))
    return f"cuda:{local_rank}"


def cmd_train(args) -> None:
    from drafter.ctc import CTCDraftModel, CTCDrafterConfig
    from drafter.data import load_distilled
    from drafter.eagle import EagleConfig, EagleDraftModel
    from drafter.hydra import HydraConfig, HydraHeads
    from drafter.medusa import MedusaConfig, MedusaHeads
    from drafter.train import HiddenStates, TrainConfig, train
    from server.runtime.loader import load_model

    base = load_model(args.model, dtype=args.dtype, device=rank_device(args.device))
    base.requires_grad_(False)
    if args.init is not None:
        draft = init_from(args.init, args.kind, base)
    elif args.kind == "ctc":
        cfg = CTCDrafterConfig.for_base(base.config, num_frames=args.frames, num_labels=args.labels,
                                        num_layers=args.layers, candidates=args.candidates,
                                        frame_inputs=args.frame_inputs)
        draft = CTCDraftModel(cfg)
    elif args.kind == "eagle":
        draft = EagleDraftModel(EagleConfig.for_base(base.config, num_labels=args.labels, num_layers=args.layers,
                                                     tree=args.tree))
    elif args.kind == "hydra":
        draft = HydraHeads(HydraConfig.for_base(base.config, num_heads=args.labels, num_layers=args.layers))
    else:
        draft = MedusaHeads(MedusaConfig.for_base(base.config, num_heads=args.labels, num_layers=args.layers))
    draft = draft.to(base.lm_head.weight.device).attach_base(base)
    tc = TrainConfig(steps=args.steps, conversations_per_step=args.conversations_per_step,
                     anchors_per_conversation=args.anchors, lr=args.lr, weight_decay=args.weight_decay,
                     aux_weight=args.aux_weight, ctc_weight=args.ctc_weight, seed=args.seed,
                     max_tokens_per_batch=args.max_tokens_per_batch,
                     hidden_states=HiddenStates(args.hidden_states), autocast_bf16=args.autocast == "bf16",
                     init=None if args.init is None else str(args.init))
    online = tc.hidden_states == HiddenStates.ONLINE
    data = load_distilled(args.data, with_hidden=not online)
    metrics = train(draft, data, args.out, tc, base=base if online else None)
    logging.info("trained %s: %s", args.out, metrics)


def init_from(path: Path, kind: str, base) -> torch.nn.Module:
    """`train --init`: the drafter at `path`, float32 and trainable, after checking it is a `kind`."""
    from drafter.loading import load_draft_model, read_drafter_config

    _, cfg = read_drafter_config(path)
    if cfg.kind != kind:
        raise ValueError(f"--init {path} is a {cfg.kind} drafter, but --kind is {kind}")
    draft = load_draft_model(path, base, torch.float32).train()
    draft.requires_grad_(True)
    logging.info("starting from %s", path)
    return draft


def cmd_eval(args) -> None:
    from drafter.evaluate import acceptance, conversation_acceptance, load_prompts, load_questions
    from server.engine.factory import build_drafter
    from server.runtime.loader import load_model, load_tokenizer

    model = load_model(args.model, dtype="float32", device=args.device)
    tok = load_tokenizer(args.model)
    prompts = load_prompts(tok, args.prompts, args.source, args.num_prompts)
    plain = None
    results = {}
    for spec in args.drafter or ["none"]:
        drafter = build_drafter(spec, model, max_slots=args.batch_size, max_len=args.max_model_len)
        learned = getattr(drafter, "learned", drafter)  # a lookup hybrid's learned part
        if getattr(learned, "name", "") == "ctc":
            cfg = learned.model.config
            cfg.candidates = args.ctc_candidates or cfg.candidates
            cfg.beam_width = args.beam_width or cfg.beam_width
            cfg.prune_topk = args.prune_topk or cfg.prune_topk
        if learned is not drafter:  # a lookup hybrid
            if args.lookup_skip is not None:
                set_lookup_skip(drafter, args.lookup_skip)
            if args.lookup_weak_score is not None:
                drafter.weak_score = args.lookup_weak_score
            if args.lookup_extend is not None:
                drafter.extend_depth = args.lookup_extend
        if args.turns == "all":  # every user turn, the model's own earlier answers in the prompt
            questions = load_questions(args.prompts, args.source, args.num_prompts)
            r = conversation_acceptance(model, tok, drafter, questions, args.max_tokens, args.tree_nodes,
                                        args.max_model_len, args.batch_size)
            outputs = r.pop("outputs")
            plain = plain or (outputs if spec == "none" else None)
            if plain is not None and spec != "none":
                r["equals_plain"] = outputs == plain
            results[spec] = r
            print(f"{spec:40s} " + "  ".join(f"{cat} tau {c['tau']:.2f}" for cat, c in r["categories"].items()))
            continue
        r = acceptance(model, tok, drafter, prompts, args.max_tokens, args.tree_nodes, args.max_model_len, args.batch_size)
        outputs = r.pop("outputs")
        plain = plain or (outputs if spec == "none" else None)
        if plain is not None and spec != "none":
            r["equals_plain"] = outputs == plain
        results[spec] = r
        print(f"{spec:40s} tau {r['tau']:.2f}  tau_spec {r['tau_spec']:.2f}  drafted/step "
              f"{r['draft_tokens_per_step']:.1f}  draft time / verify time {r['propose_share_of_verify']:.2f}")
        print(f"{'':40s} steps by tokens emitted: " + "  ".join(f"{n}: {share:.0%}" for n, share in r["tokens_per_step"].items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def set_lookup_skip(hybrid, n: int) -> None:
    """`--lookup-skip N` on a lookup hybrid: 0 -> always ask the learned drafter."""
    try:
        hybrid.skip_learned_ngram = n or None
    except ValueError:  # the hybrid's own bound, in the flag's terms
        raise SystemExit(f"--lookup-skip must be 0 or >= {hybrid.lookup_min_ngram}, got {n}") from None


def parser() -> argparse.ArgumentParser:
    from drafter.ctc import CANDIDATE_SEARCHES, FRAME_INPUTS

    ap = argparse.ArgumentParser(prog="ctc-drafter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, default=DEMO_MODEL, help="base model directory (Hugging Face layout)")
    common.add_argument("--device", default="auto", help="cpu, cuda or auto")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    d = sub.add_parser("distill", parents=[common], help="run the base model over the corpus; store hidden states and greedy labels")
    d.add_argument("--corpus", type=Path, default=CORPUS, help="chat transcripts, one JSON object per line (training split is used)")
    d.add_argument("--out", type=Path, required=True, help="output directory for shard-*.safetensors")
    d.add_argument("--regenerate", action="store_true", help="rewrite assistant turns with the base model's greedy output first (self-distillation)")
    d.add_argument("--perturb-numbers", action="store_true",
                   help="with --regenerate: replace the numbers in user turns first, so the base model answers "
                        "questions it has not memorised (as at serving time)")
    d.add_argument("--regenerate-temperature", type=float, default=0.0,
                   help="with --regenerate: sample the new turns at this temperature (seeded per conversation) "
                        "instead of decoding greedily, so repeated questions get different answers")
    d.add_argument("--max-conversations", type=int, default=None, help="use only the first N training conversations")
    d.add_argument("--skip-conversations", type=int, default=0,
                   help="start after the first N training conversations (to distill more data into a second directory)")
    d.add_argument("--max-len", type=int, default=512, help="truncate conversations to this many tokens")
    d.add_argument("--max-new-tokens", type=int, default=320, help="longest regenerated turn")
    d.add_argument("--batch-size", type=int, default=32, help="sequences decoded at once while regenerating")
    d.add_argument("--shard-size", type=int, default=1000, help="conversations per shard file")
    d.add_argument("--hidden-states", choices=["stored", "online"], default="stored",
                   help="stored: run the base model now and store hidden states and labels; online: store token ids "
                        "and assistant masks only, for `train --hidden-states online` (large base models)")
    d.set_defaults(fn=cmd_distill)

    t = sub.add_parser("train", parents=[common], help="train a CTC drafter or the Medusa baseline on distilled data")
    t.add_argument("--data", type=Path, required=True, action="append",
                   help="directory written by `distill`; repeat to train on several")
    t.add_argument("--out", type=Path, required=True, help="drafter directory to write (config.json + model.safetensors); resumes from out/.train")
    t.add_argument("--kind", choices=["ctc", "medusa", "hydra", "eagle"], default="ctc")
    t.add_argument("--init", type=Path, default=None,
                   help="start from this trained drafter's weights (its architecture; --kind must match, the "
                        "shape flags are ignored): more steps or more data for a drafter, with a fresh "
                        "learning-rate schedule (a lower --lr suits)")
    t.add_argument("--frames", type=int, default=6, help="CTC: N frames per draft")
    t.add_argument("--labels", type=int, default=4, help="K next base tokens to learn (Medusa: number of heads)")
    t.add_argument("--layers", type=int, default=1,
                   help="CTC, EAGLE: decoder layers; Medusa, Hydra: residual blocks per head")
    t.add_argument("--tree", choices=["dynamic", "static"], default="dynamic",
                   help="EAGLE: draft tree at inference (EAGLE-2's dynamic top-k or EAGLE-1's static shape)")
    t.add_argument("--ctc-weight", type=float, default=0.0,
                   help="EAGLE: weight of the auxiliary CTC loss over drafted positions (the CTC-drafter authors': 0.01)")
    t.add_argument("--candidates", choices=CANDIDATE_SEARCHES, default="beam", help="CTC: candidate search at inference")
    t.add_argument("--frame-inputs", choices=FRAME_INPUTS, default="queries",
                   help="CTC: each frame's input is a learned query (queries) or a learned query plus the last "
                        "context position's input (anchored)")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--conversations-per-step", type=int, default=8)
    t.add_argument("--anchors", type=int, default=None,
                   help="anchor positions sampled per conversation and step (default: 24 for ctc and eagle, "
                        "every one for medusa and hydra; 0: every one)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.3,
                   help="AdamW weight decay (decoupled); 0.3 drafted best on the demo model (BENCHMARKS.md)")
    t.add_argument("--aux-weight", type=float, default=0.0, help="CTC: weight of the frame-aligned cross-entropy")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the frozen base model's dtype (bfloat16 for a 7-8B model: half the memory)")
    t.add_argument("--hidden-states", choices=["stored", "online"], default="stored",
                   help="stored: read them from --data; online: run the frozen base model over each batch "
                        "(data from `distill --hidden-states online` suffices)")
    t.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16: the drafter's forward under bfloat16 autocast, its weights and optimizer state float32")
    t.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="pack conversations into batches of at most this many tokens per rank (instead of "
                        "--conversations-per-step); every conversation once per epoch")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", parents=[common], help="acceptance length on held-out prompts (greedy)")
    e.add_argument("--drafter", action="append", help="drafter directory, 'ngram' or 'none'; repeatable")
    e.add_argument("--prompts", type=Path, default=REPO.parent / "shared" / "data" / "eval_prompts.jsonl")
    e.add_argument("--source", default="gsm8k", help="gsm8k, mt_bench or all")
    e.add_argument("--num-prompts", type=int, default=40)
    e.add_argument("--turns", choices=["first", "all"], default="first",
                   help="all: every user turn (MT-bench has two), the model's own answers in the later prompts; "
                        "figures per category")
    e.add_argument("--max-tokens", type=int, default=256)
    e.add_argument("--tree-nodes", type=int, default=16, help="draft nodes per step")
    e.add_argument("--max-model-len", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--ctc-candidates", choices=CANDIDATE_SEARCHES,
                   help="override CTC drafters' candidate search: prefix beam search or the paper's static top-k tree")
    e.add_argument("--beam-width", type=int, help="override CTC drafters' beam width (candidates kept)")
    e.add_argument("--prune-topk", type=int, help="override CTC drafters' per-frame top-k in beam search")
    e.add_argument("--lookup-skip", type=int, metavar="N",
                   help="DIR+ngram drafters: skip the learned drafter where prompt lookup matched >= N tokens "
                        "(default 3; 0: always ask it)")
    e.add_argument("--lookup-weak-score", type=float, metavar="S",
                   help="DIR+ngram drafters: the score (a log-probability) of lookup candidates from a match "
                        "shorter than 2 tokens, against the learned drafter's candidates (default -4.5)")
    e.add_argument("--lookup-extend", type=int, metavar="N",
                   help="DIR+ngram drafters: extend each learned candidate by up to N tokens of what followed its "
                        "last tokens earlier in the text (default 8; 0: off)")
    e.add_argument("--out", type=Path, help="write the figures as JSON here")
    e.set_defaults(fn=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError) as exc:
        logging.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
