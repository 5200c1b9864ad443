"""Structured outputs: a GrammarSpec compiled against the tokenizer, one matcher per sequence, and
the three places a grammar acts in a speculative step.

Engine: llguidance (MIT, one abi3 wheel, no Python dependencies; a Rust Earley parser with a lazy
lexer that computes a token mask in well under a millisecond, with rollback and validate_tokens:
exactly what walking a draft tree needs). README.md "Structured outputs" says why not the others.

The output is prefix, one JSON value (any object, or valid against the schema), suffix, then only
EOS (types.GrammarSpec). In one step, for a constrained sequence whose matcher has consumed every
emitted token (the pending root included):
  (a) `prune`, before the forward: walk the draft tree depth first, advancing the matcher into
      each node and rolling it back after its subtree; a node whose token the grammar forbids after
      its path is dropped with its subtree. The tree stays valid (parents before children, same
      order). This only saves verify work: a forbidden draft could never match a decided token,
      because (b) masks it, so acceptance is unchanged by pruning;
  (b) `allowed`, at every node the walk decides: the matcher forked along the node's path (consume
      the path tokens, compute the bitmask, roll back) gives the allowed set; logits_process masks
      the rest to -inf, so the decided token (and the bonus) comes from the masked distribution, at
      the same state plain decoding would be in;
  (c) `advance`, after acceptance: the matcher consumes the emitted tokens for good.
EOS is never consumed by a fork: a path through an EOS node allows only EOS below it (the request
ends there), and llguidance's rollback does not undo the stop an EOS causes.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence as Seq

import llguidance
import llguidance.hf
import torch

from drafter.tree import TokenTree
from server.engine.sequence import Sequence
from server.engine.types import EngineError, GrammarSpec

log = logging.getLogger(__name__)

MAX_COMPILED = 64  # distinct grammars kept compiled; a compile costs a few ms, a matcher ~2 ms


# One layout for JSON, as json.dumps writes it: llguidance's default allows any whitespace between
# tokens, which lets a weak or unlucky model spend its whole budget on newlines inside a valid value.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def spec_to_lark(spec: GrammarSpec) -> str:
    """The Lark grammar (llguidance's dialect, with its %json extension) for a spec."""
    schema = dict(spec.schema) if spec.kind == "json_schema" else {"type": "object"}
    schema["x-guidance"] = JSON_LAYOUT
    parts = [json.dumps(s) for s in (spec.prefix,) if s] + ["value"] + [json.dumps(s) for s in (spec.suffix,) if s]
    return f"start: {' '.join(parts)}\nvalue: %json {json.dumps(schema)}\n"


class Grammars:
    """Compiled grammars, cached by spec, and the matcher of each constrained sequence."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Seq[int]):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_ids = frozenset(eos_ids)
        self._lltok = None  # built on the first constrained request (~50 ms for a 32k vocabulary)
        self._compiled: OrderedDict[str, str] = OrderedDict()  # spec key -> grammar, least recent first
        self._matchers: dict[str, llguidance.LLMatcher] = {}

    # -- life of a sequence ----------------------------------------------------------------------
    def start(self, seq: Sequence) -> None:
        """Give a constrained sequence its matcher; raise EngineError (a 400) for a grammar that does
        not compile. A no-op for unconstrained sequences."""
        spec = seq.params.grammar
        if spec is not None:
            self._matchers[seq.request_id] = self._new_matcher(spec)

    def release(self, seq: Sequence) -> None:
        self._matchers.pop(seq.request_id, None)

    def advance(self, seq: Sequence, token: int) -> bool:
        """(c) Consume one emitted token; True when it was EOS (the grammar is finished)."""
        m = self._matchers.get(seq.request_id)
        if m is None:
            return False
        if not m.consume_token(token):
            raise RuntimeError(f"grammar refused emitted token {token}: {m.get_error()[:200]}")
        return token in self.eos_ids

    # -- the step --------------------------------------------------------------------------------
    def prune(self, seqs: Seq[Sequence], trees: list[TokenTree]) -> list[TokenTree]:
        """(a) Each tree without the nodes its sequence's grammar forbids (and their subtrees)."""
        out = []
        for seq, tree in zip(seqs, trees):
            m = self._matchers.get(seq.request_id)
            if m is not None and tree.num_nodes > 1:
                try:
                    tree = keep_nodes(tree, self._allowed_nodes(m, tree))
                except Exception:  # costs this sequence its draft only; (b) still enforces the grammar
                    log.exception("request %s: pruning its draft tree failed; decoding it without drafts",
                                  seq.request_id)
                    tree = TokenTree.chain(tree.tokens[0], [])
            out.append(tree)
        return out

    def allowed(self, seqs: Seq[Sequence], paths: Seq[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
        """(b) (G, vocab) bool: the tokens seqs[g]'s grammar allows after its output and paths[g]."""
        words = (vocab + 31) // 32
        buf = bytearray()
        for seq, path in zip(seqs, paths):
            buf += self._bitmask(self._matchers[seq.request_id], list(path), words)
        bits = torch.frombuffer(buf, dtype=torch.int32).view(len(seqs), words).to(device)  # (G, W)
        shifts = torch.arange(32, dtype=torch.int32, device=device)  # (32,) bit t % 32 of word t // 32
        return ((bits[:, :, None] >> shifts) & 1).view(len(seqs), words * 32)[:, :vocab].bool()  # (G, V)

    # -- helpers ---------------------------------------------------------------------------------
    def _bitmask(self, m: llguidance.LLMatcher, path: list[int], words: int) -> bytes:
        """The allowed-token bitmask after consuming `path` (then rolled back), `words` int32 long."""
        if any(t in self.eos_ids for t in path):  # past an EOS the request has ended: only EOS
            return _eos_only(self.eos_ids, words)
        if path and not m.consume_tokens(path):
            raise RuntimeError(f"a pruned draft path left the grammar: {m.get_error()[:200]}")
        try:
            mask = m.compute_bitmask()
        finally:
            if path:
                m.rollback(len(path))
        return (mask + bytes(4 * words))[: 4 * words]  # the model may have more rows than the tokenizer

    def _allowed_nodes(self, m: llguidance.LLMatcher, tree: TokenTree) -> list[bool]:
        """keep[i]: node i's token is allowed after its path (node 0, already consumed, is kept)."""
        kids: list[list[int]] = [[] for _ in tree.tokens]
        for i in range(1, tree.num_nodes):
            kids[tree.parents[i]].append(i)
        keep = [False] * tree.num_nodes
        keep[0] = True

        def visit(i: int) -> None:  # the matcher stands after node i's path
            for c in kids[i]:
                tok = tree.tokens[c]
                if tok in self.eos_ids:  # allowed iff the grammar may end here; nothing follows it
                    keep[c] = m.is_accepting()
                elif m.validate_tokens([tok]) == 1:
                    keep[c] = True
                    m.consume_token(tok)
                    visit(c)
                    m.rollback(1)

        visit(0)
        return keep

    def _new_matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        key = json.dumps([spec.kind, spec.schema, spec.prefix, spec.suffix], sort_keys=True)
        grammar = self._compiled.pop(key, None) or llguidance.LLMatcher.grammar_from_lark(spec_to_lark(spec))
        m = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise EngineError(f"the response format's schema cannot be enforced: {m.get_error()[:300]}")
        self._compiled[key] = grammar
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.popitem(last=False)
        return m

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            if not hasattr(self.tokenizer, "backend_tokenizer"):
                raise EngineError("structured outputs need the model's fast (tokenizer.json) tokenizer")
            n = max(self.vocab_size, len(self.tokenizer))
            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n, eos_token=sorted(self.eos_ids))
        return self._lltok


def keep_nodes(tree: TokenTree, keep: list[bool]) -> TokenTree:
    """The subtree of kept nodes, in the same order. A kept node's parent must be kept."""
    index = {}
    tokens, parents, depths = [], [], []
    for i, k in enumerate(keep):
        if k:
            index[i] = len(tokens)
            tokens.append(tree.tokens[i])
            parents.append(index[tree.parents[i]] if i else -1)
            depths.append(tree.depths[i])
    return TokenTree(tokens, parents, depths, tree.forward_above)


def _eos_only(eos_ids: frozenset[int], words: int) -> bytes:
    """A bitmask allowing only EOS: little-endian int32 words, so token t is bit t % 8 of byte t // 8."""
    mask = bytearray(4 * words)
    for t in eos_ids:
        if t < 32 * words:
            mask[t // 8] |= 1 << (t % 8)
    return bytes(mask)
