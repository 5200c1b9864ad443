"""Tool calls: the grammar that forces one, and the parser that finds them in a model's output.

The format is the one the demo model's chat template teaches (models/demo-llama/README.md): the
template lists the offered tools in the system turn, and a call is
`<tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>` in the assistant's
text. A chat template that supports tools must use these markers.

- `tool_choice: required` or a named function: the engine is given a grammar (`forced_call_grammar`)
  whose output is exactly one such block, the arguments valid against the function's parameters,
  then the end of the turn; the parser reads it back.
- `tool_choice: auto`: nothing is forced; `ToolCallParser` finds every complete block whose JSON
  names an offered function and has an object of arguments; everything else (including a block
  that does not parse) stays text. It works on a stream: text that may be the start of a block is
  held back until it is known, and a call is sent once its block is complete.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server.engine.types import GrammarSpec

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # the arguments of a function without parameters


def forced_call_grammar(functions: Iterable[tuple[str, dict | None]], named: str | None = None) -> GrammarSpec:
    """A grammar for exactly one call of one of `functions` ((name, parameters schema)), or of
    `named` only: {"name": <const>, "arguments": <valid against its parameters>} in the markers."""
    options = [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters or ANY_OBJECT},
         "required": ["name", "arguments"], "additionalProperties": False}
        for name, parameters in functions if named is None or name == named
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return GrammarSpec(kind="json_schema", schema=schema, prefix=CALL_START, suffix=CALL_END)


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI sends arguments


@dataclass
class Piece:
    """What the parser found in the text so far: text to show as content, or a call."""

    content: str = ""
    call: ParsedCall | None = None


class ToolCallParser:
    """Splits a model's output, as it streams in, into content and tool calls."""

    def __init__(self, names: Iterable[str], parallel: bool = True) -> None:
        self.names = frozenset(names)
        self.parallel = parallel
        self.calls = 0
        self._held = ""  # text not yet known to be content: a block, or what may start one

    def push(self, text: str) -> list[Piece]:
        self._held += text
        pieces = []
        while True:
            start = self._held.find(CALL_START)
            if start < 0:
                keep = _partial_marker(self._held)
                pieces.append(Piece(self._held[: len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep :]
                break
            pieces.append(Piece(self._held[:start]))
            end = self._held.find(CALL_END, start)
            if end < 0:
                self._held = self._held[start:]
                break
            block, self._held = self._held[start : end + len(CALL_END)], self._held[end + len(CALL_END) :]
            call = self._call(block[len(CALL_START) : -len(CALL_END)])
            pieces.append(Piece(call=call) if call else Piece(block))
        return [p for p in pieces if p.content or p.call]

    def flush(self) -> list[Piece]:
        """The end of the output: what is held back is content (an unfinished block included)."""
        held, self._held = self._held, ""
        return [Piece(held)] if held else []

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """A whole output: its content and its calls."""
        pieces = self.push(text) + self.flush()
        return "".join(p.content for p in pieces), [p.call for p in pieces if p.call]

    def _call(self, body: str) -> ParsedCall | None:
        if self.calls and not self.parallel:
            return None
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(value, dict) and value.get("name") in self.names and isinstance(value.get("arguments"), dict)):
            return None
        self.calls += 1
        return ParsedCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(value["arguments"], ensure_ascii=False))


def _partial_marker(text: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of CALL_START (held back: it
    may be the start of a block)."""
    return max((n for n in range(len(CALL_START) - 1, 0, -1) if text.endswith(CALL_START[:n])), default=0)
