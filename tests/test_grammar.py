"""Structured outputs in the engine: compile, prune draft trees, mask, advance; speculative output
equals plain output; 50 generated JSON schemas validate; constrained speculative sampling follows
the exact constrained distribution (chi-square, with a negative control).
"""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import pytest
import torch

from drafter.tree import TokenTree, build_trie
from server.engine.grammar import Grammars, keep_nodes, spec_to_lark
from server.engine.types import EngineError, FinishReason, GrammarSpec, SamplingParams
from tests.chi_square import chi_square_pvalue
from tests.test_engine import run_all
from tests.test_logits_process import ACCEPTANCES, DEMO_MODEL_CTC, DRAFTERS, demo, demo_engine, demo_prompts, fake_seq

EOS = 2  # the demo model's


def grammars() -> Grammars:
    tok, model = demo()
    return Grammars(tok, model.config.vocab_size, [EOS])


def encode(text: str) -> list[int]:
    return demo()[0].encode(text, add_special_tokens=False)


def test_prefix_and_suffix_are_literal_text():
    spec = GrammarSpec("json_object", prefix='<tool_call>\n"x\\', suffix="</tool_call>")
    g = grammars()
    seq = fake_seq([1], [], SamplingParams(grammar=spec))
    g.start(seq)
    for tok in encode('<tool_call>\n"x\\{"a": 1}</tool_call>'):
        assert not g.advance(seq, tok)
    assert g.advance(seq, EOS)
    assert "%json" in spec_to_lark(spec)


def test_a_schema_that_cannot_be_enforced_is_refused():
    bad = SamplingParams(grammar=GrammarSpec("json_schema", {"type": "object", "properties": {"a": {"$ref": "#/no"}}}))
    with pytest.raises(EngineError, match="schema"):
        demo_engine(None).add_request("r", [5, 6], bad)


def test_an_emitted_token_the_grammar_forbids_fails_loudly():
    g = grammars()
    seq = fake_seq([1], [], SamplingParams(grammar=GrammarSpec("json_object")))
    g.start(seq)
    with pytest.raises(RuntimeError, match="refused"):
        g.advance(seq, encode("hello")[0])


# -- (a) pruning --------------------------------------------------------------------------------
def brute_force_keep(tree: TokenTree, spec: GrammarSpec, emitted: list[int]) -> list[bool]:
    """Node i is allowed iff a fresh matcher accepts emitted + its whole path (an EOS only as the last
    token, and only where the grammar may end)."""
    g = grammars()
    lltok = g._tokenizer()
    grammar = llguidance.LLMatcher.grammar_from_lark(spec_to_lark(spec))
    keep = []
    for i in range(tree.num_nodes):
        path = emitted + [tree.tokens[j] for j in tree.path_to(i)[1:]]
        m = llguidance.LLMatcher(lltok, grammar)
        body, last = (path[:-1], path[-1]) if path and path[-1] == EOS else (path, None)
        ok = EOS not in body and m.validate_tokens(body) == len(body) and m.consume_tokens(body)
        keep.append(bool(ok) and (last is None or m.is_accepting()))
    return keep


def test_pruning_removes_exactly_the_forbidden_subtrees():
    spec = GrammarSpec("json_schema", {"type": "object", "properties": {"n": {"type": "integer"}},
                                       "required": ["n"], "additionalProperties": False})
    emitted = encode('{"n": 1')  # the pending token is the last one
    rng = random.Random(0)
    pieces = ["2", "3", "}", "0}", " x", '"', ",", "5}", "}}", "a"]
    for trial in range(20):
        cands = [[encode(rng.choice(pieces))[0] for _ in range(rng.randint(1, 4))] for _ in range(6)]
        cands += [[encode("}")[0], EOS, encode("2")[0]], [EOS]]
        tree = build_trie(emitted[-1], cands, max_nodes=40)
        g = grammars()
        seq = fake_seq([1], emitted, SamplingParams(grammar=spec))
        g.start(seq)
        for t in emitted:
            g.advance(seq, t)
        want = brute_force_keep(tree, spec, emitted)  # the root, emitted[-1], is consumed
        assert want[0] and not all(want), trial  # the trial prunes something and keeps the root
        pruned = g.prune([seq], [tree])[0]
        assert pruned.tokens == keep_nodes(tree, want).tokens and pruned.parents == keep_nodes(tree, want).parents
        # the matcher is back where it was: the same pruning again gives the same tree
        assert g.prune([seq], [tree])[0] == pruned


# -- (b) + (c) in the engine: speculative == plain ------------------------------------------------
SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "integer", "minimum": 0, "maximum": 1000},
    "unit": {"enum": ["apples", "cats", "none"]},
    "steps": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["answer", "unit", "steps"], "additionalProperties": False}


def constrained_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    specs = [GrammarSpec("json_object"), GrammarSpec("json_schema", SCHEMA),
             GrammarSpec("json_schema", SCHEMA, prefix="<tool_call>", suffix="</tool_call>")]
    reqs = {}
    for i, prompt in enumerate(demo_prompts(6)):
        sampled = dict(temperature=0, logprobs=1) if i % 2 == 0 else dict(temperature=0.9, seed=i, logprobs=0)
        reqs[f"g{i}"] = (prompt, SamplingParams(max_tokens=64, grammar=specs[i % 3], **sampled))
    return reqs


@pytest.mark.parametrize("acceptance", list(ACCEPTANCES))
@pytest.mark.parametrize("drafter_spec", DRAFTERS)
def test_speculative_equals_plain_under_a_grammar(drafter_spec, acceptance):
    reqs = constrained_requests()
    plain = run_all(demo_engine(None), reqs)
    spec = run_all(demo_engine(drafter_spec, acceptance=acceptance), reqs)
    for rid, (_, p) in reqs.items():
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
        for a, b in zip(spec[rid]["logprobs"], plain[rid]["logprobs"], strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4, rid
        if plain[rid]["finish"] == FinishReason.STOP:
            text = plain[rid]["text"].removeprefix(p.grammar.prefix).removesuffix(p.grammar.suffix)
            value = json.loads(text)
            jsonschema.validate(value, p.grammar.schema or {"type": "object"})
    assert sum(o["finish"] == FinishReason.STOP for o in plain.values()) >= 3
    assert sum(o["accepted"] for o in spec.values()) > 0, "the drafter never helped: nothing was tested"


def test_constrained_requests_draft_with_the_hybrids_lookup_tier_only():
    """Under a grammar the learned half of a hybrid drafter is not asked (drafter_guard._tier);
    the same prompts unconstrained are, in the same engine."""
    engine = demo_engine(str(DEMO_MODEL_CTC) + "+ngram")
    asked: list[str] = []
    learned = engine.guard.drafter.learned
    real = learned.candidates

    def counting(requests):
        asked.extend(r.seq_id for r in requests)
        return real(requests)

    learned.candidates = counting
    reqs = constrained_requests()
    free = {f"free{i}": (prompt, SamplingParams(max_tokens=24, temperature=0)) for i, prompt in enumerate(demo_prompts(2))}
    out = run_all(engine, {**reqs, **free})
    assert sum(out[r]["accepted"] for r in reqs) > 0  # lookup still drafts for them
    assert asked and set(asked) <= set(free)


# -- 50 generated schemas ----------------------------------------------------------------------
def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of an object with 1-4 required properties: bounded integers and numbers, enums,
    booleans, short strings, small arrays and (up to depth 2) nested objects."""
    props = {}
    for k in range(rng.randint(1, 4)):
        kind = rng.choice(["integer", "number", "enum", "boolean", "string", "array"] + ["object"] * (depth < 2))
        if kind == "integer":
            lo = rng.randint(-50, 50)
            s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
        elif kind == "number":
            lo = rng.uniform(-10, 10)
            s = {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 100), 2)}
        elif kind == "enum":
            s = {"enum": rng.sample(["red", "green", "blue", "cat", "dog", "yes", "no", 1, 2.5, None], rng.randint(1, 4))}
        elif kind == "boolean":
            s = {"type": "boolean"}
        elif kind == "string":
            s = {"type": "string", "maxLength": rng.randint(1, 10)}
        elif kind == "array":
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["a", "b", "c"]}])
            lo = rng.randint(0, 2)
            s = {"type": "array", "items": item, "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
        else:
            s = random_schema(rng, depth + 1)
        props[f"{kind[:3]}_{k}"] = s
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


@pytest.mark.slow
@pytest.mark.parametrize("drafter_spec", [None, "ngram"])
def test_fifty_generated_schemas_always_validate(drafter_spec):
    rng = random.Random(2026)
    schemas = [random_schema(rng) for _ in range(50)]
    prompts = demo_prompts(6)
    reqs = {f"s{i}": (prompts[i % 6], SamplingParams(max_tokens=80, temperature=0 if i % 2 else 0.8, seed=i,
                                                   grammar=GrammarSpec("json_schema", s)))
            for i, s in enumerate(schemas)}
    out = run_all(demo_engine(drafter_spec, batch=25), reqs, max_steps=20000)
    stopped = 0
    for i, s in enumerate(schemas):
        o = out[f"s{i}"]
        assert o["finish"] in (FinishReason.STOP, FinishReason.LENGTH), o
        if o["finish"] == FinishReason.STOP:
            stopped += 1
            jsonschema.validate(json.loads(o["text"]), s)
    assert stopped >= 40, f"only {stopped} of 50 finished: the test checks too little"


# -- statistics ---------------------------------------------------------------------------------
ENUM = GrammarSpec("json_schema", {"enum": ["red", "green", "blue", "yellow", "black"]})


def exact_outcomes(prompt: list[int], temperature: float, floor: float = 1e-5) -> dict[tuple[int, ...], float]:
    """P(token sequence) of constrained sampling, by enumerating every grammar-allowed continuation
    with transformers' logits masked by a fresh matcher (sequences below `floor` are dropped)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import DEMO_MODEL

    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    g = grammars()
    out: dict[tuple[int, ...], float] = {}

    def visit(tokens: list[int], prob: float) -> None:
        if tokens and tokens[-1] == EOS:
            out[tuple(tokens)] = prob
            return
        seq = fake_seq(prompt, [], SamplingParams(grammar=ENUM))
        g.start(seq)
        for t in tokens:
            g.advance(seq, t)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, -1].float()
        allowed = g.allowed([seq], [[]], logits.shape[0], logits.device)[0]
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")) / temperature, dim=-1)
        for t in allowed.nonzero().flatten().tolist():
            if prob * float(p[t]) >= floor:
                visit(tokens + [t], prob * float(p[t]))

    visit([], 1.0)
    return out


@pytest.mark.slow
def test_constrained_speculative_sampling_follows_the_constrained_distribution():
    prompt = demo_prompts(4)[3]  # "List three colours."
    n = 240
    reqs = {f"c{i}": (prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=1000 + i, grammar=ENUM))
            for i in range(n)}
    spec = run_all(demo_engine(DRAFTERS[1], batch=40), reqs, max_steps=20000)
    plain = run_all(demo_engine(None, batch=40), reqs, max_steps=20000)
    assert all(spec[r]["tokens"] == plain[r]["tokens"] for r in reqs)  # seeded: the same samples

    exact = exact_outcomes(prompt, 1.0)
    cells = sorted(exact, key=exact.get, reverse=True)
    counts = torch.zeros(len(cells) + 1)
    for o in spec.values():
        t = tuple(o["tokens"])
        counts[cells.index(t) if t in cells else -1] += 1
    probs = torch.tensor([exact[c] for c in cells] + [max(0.0, 1 - sum(exact.values()))])
    assert len([c for c in counts[:-1] if c > 0]) >= 3, "too few outcomes to test anything"
    assert chi_square_pvalue(counts, probs) > 1e-3
    # negative control: the same counts against the distribution at another temperature
    wrong = exact_outcomes(prompt, 1.6)
    wrong_probs = torch.tensor([wrong.get(c, 0.0) for c in cells] + [max(0.0, 1 - sum(wrong.get(c, 0.0) for c in cells))])
    assert chi_square_pvalue(counts, wrong_probs) < 1e-3
