"""Incremental detokenization with stop strings.

Tokens arrive a few at a time; text must go out as soon as it is certain:
- a byte-level BPE token can end in the middle of a multi-byte UTF-8 character, which decodes
  to U+FFFD until the next token completes it, so text ending in U+FFFD is held back;
- decoding only a window of recent tokens (from `prefix_offset`) keeps each step O(window), and
  starting the window a few tokens back lets tokenizers that merge across tokens (leading
  spaces in SentencePiece) decode the new tokens as they would inside the whole text;
- a stop string may span tokens, so text that could be the start of a stop string is held back
  until the next tokens rule it in or out; the stop string and everything after it never leave.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for decoding the new tokens
        self.read_offset = 0  # tokens whose text is already in self.text
        self.text = ""  # all text decoded so far (before stop truncation)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text that is now final (may be ""). Sets `stopped` when a stop
        string appears; the returned text then ends right before it."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended for another reason (EOS, length): release what was held back."""
        if self.stopped:
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            # Search only where a stop string could newly appear: it must end after `sent`.
            start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                out, self.sent = self.text[self.sent : end], end
                return out
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
