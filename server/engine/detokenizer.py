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

import re


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


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table), inverted:
    printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def token_bytes(tokenizer, token_ids: list[int]) -> list[bytes]:
    """The bytes each token adds to the text (OpenAI's logprobs `bytes`), token by token.

    Exact for byte-level BPE (Llama 3, Qwen2, the demo model) and SentencePiece with byte fallback
    (Llama 2, Mistral), where one token may hold part of a multi-byte character; for any other
    tokenizer, the token decoded on its own. Special tokens give their own text (e.g. EOS).
    """
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel"
    out = []
    for token_id, piece in zip(token_ids, pieces):
        if byte_level and all(c in _BYTE_LEVEL for c in piece):
            out.append(bytes(_BYTE_LEVEL[c] for c in piece))
        elif m := _BYTE_PIECE.fullmatch(piece):
            out.append(bytes([int(m[1], 16)]))
        elif not byte_level and "\u2581" in piece:  # SentencePiece's word-start marker is a space
            out.append(piece.replace("\u2581", " ").encode())
        else:
            out.append(tokenizer.decode([token_id]).encode())
    return out
