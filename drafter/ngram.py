"""Training-free n-gram drafter ("prompt lookup decoding").

Looks for the longest recent n-gram (n = max_ngram down to min_ngram) ending the sequence's
text so far, including the pending token, that also occurs earlier in the prompt or output, and
proposes what followed it there. Several earlier occurrences give several candidates, which the
trie merges, so the budget buys breadth where the text is ambiguous and depth where it is not.
Strong wherever answers quote their question or repeat themselves (step-by-step arithmetic
repeats its numbers), useless elsewhere, and then it proposes nothing and costs nothing.
"""

from __future__ import annotations

from collections import defaultdict

from drafter.base import Drafter, ProposeRequest
from drafter.tree import TokenTree, build_trie


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_candidates: int = 4, max_depth: int = 8):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_candidates, self.max_depth = max_candidates, max_depth
        self._tokens: dict[str, list[int]] = {}
        # n -> {n-gram: positions right after each occurrence}, grown as tokens arrive.
        self._index: dict[str, dict[int, dict[tuple[int, ...], list[int]]]] = {}

    def start(self, seq_id: str, prompt_ids: list[int]) -> None:
        self._tokens[seq_id] = []
        self._index[seq_id] = {n: defaultdict(list) for n in range(self.min_ngram, self.max_ngram + 1)}

    def observe(self, seq_id: str, token_ids: list[int], hidden=None) -> None:
        toks, index = self._tokens[seq_id], self._index[seq_id]
        for t in token_ids:
            toks.append(t)
            end = len(toks)
            for n, table in index.items():
                if end >= n:
                    table[tuple(toks[end - n : end])].append(end)

    def propose(self, requests: list[ProposeRequest]) -> list[TokenTree]:
        trees = []
        for r in requests:
            cands, _ = self.lookup(r)
            trees.append(build_trie(r.pending_token, cands, max_nodes=r.budget))  # ranked by recency
        return trees

    def lookup(self, req: ProposeRequest, depth: int | None = None) -> tuple[list[list[int]], int]:
        """Continuations of the longest matching n-gram, most recent occurrence first, and that n
        (0 and no candidates when nothing matches); `depth` tokens at most (default: as many as
        the budget could hold, up to `max_depth`)."""
        toks = self._tokens[req.seq_id]
        depth = min(self.max_depth, req.budget if depth is None else depth)
        cands, seen, matched = [], set(), 0
        for n, s in self._occurrences(req.seq_id, [req.pending_token], self.min_ngram):
            if matched and n < matched:  # only the longest n-gram that matched
                break
            matched = n
            cont = tuple(toks[s : s + depth])
            if cont not in seen:
                seen.add(cont)
                cands.append(list(cont))
                if len(cands) == self.max_candidates:
                    break
        return cands, matched

    def continuation(self, seq_id: str, draft: list[int], depth: int, min_ngram: int) -> list[int]:
        """What followed, at its most recent earlier occurrence, the longest n-gram (n >= min_ngram)
        ending the text extended by `draft` (the pending token and tokens drafted after it), up to
        `depth` tokens; [] when none occurs."""
        for _, s in self._occurrences(seq_id, draft, min_ngram):
            return self._tokens[seq_id][s : s + depth]
        return []

    def _occurrences(self, seq_id: str, draft: list[int], min_ngram: int):
        """(n, s) for the earlier occurrences of the n-grams ending the text extended by `draft`,
        longest n first (down to min_ngram), most recent first, s the position right after one;
        only occurrences followed by a token of the text (the text's own suffix is not)."""
        toks, index = self._tokens[seq_id], self._index[seq_id]
        context = toks[-self.max_ngram :] + draft
        for n in range(min(self.max_ngram, len(context)), min_ngram - 1, -1):
            for s in reversed(index[n].get(tuple(context[-n:]), ())):
                if s < len(toks):
                    yield n, s

    def release(self, seq_id: str) -> None:
        self._tokens.pop(seq_id, None)
        self._index.pop(seq_id, None)
