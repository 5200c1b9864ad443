"""Tool calls: their request schemas, the grammar that forces one, and the parser that finds them.

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
  held back until it is known, and a call is sent once its block is complete. A forced call is
  streamed as it is generated: its name once its head is in, then its arguments piece by piece.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from server.api.fields import REQUEST_CONFIG, JsonObject, Name, Text
from server.engine.types import GrammarSpec

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128  # OpenAI's limit
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # the arguments of a function without parameters


# ---------------------------------------------------------------- request schemas


class FunctionDefinition(BaseModel):
    model_config = REQUEST_CONFIG
    name: Name
    description: Text | None = None
    parameters: JsonObject | None = Field(
        None, description="JSON schema of the arguments, an object (its `type`, if given, is \"object\"); none: any object.",
        json_schema_extra={"properties": {"type": {"const": "object"}}})
    strict: bool | None = Field(None, description="Accepted either way: a forced call's arguments always follow the schema.")


    @field_validator("parameters")
    @classmethod
    def _arguments_are_an_object(cls, parameters: dict | None) -> dict | None:
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError("the arguments of a function are a JSON object: parameters' type must be \"object\"")
        return parameters


class Tool(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = REQUEST_CONFIG
    name: Name


class NamedToolChoice(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = REQUEST_CONFIG
    name: Text
    arguments: Text = Field(description="The arguments as a JSON text (rendered into the prompt as sent).")


class ToolCall(BaseModel):
    """A call an assistant message of the history made."""

    model_config = REQUEST_CONFIG
    id: Text
    type: Literal["function"]
    function: FunctionCall



# ---------------------------------------------------------------- grammar and parser


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
    arguments: str  # a JSON text, as OpenAI sends arguments (so far, for a call still streaming)


@dataclass
class Piece:
    """What the parser found in the text so far: text to show as content, a call (with its
    arguments so far), or more of the arguments of the call before it (`arguments`)."""

    content: str = ""
    call: ParsedCall | None = None
    arguments: str = ""


# The head of a call as the template writes it, up to where its arguments start. Names are
# [a-zA-Z0-9_-] (protocol.NAME_PATTERN), so the name needs no JSON unescaping.
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """Splits a model's output, as it streams in, into content and tool calls.

    Two ways to read a call. Checked (the default, for `auto`): a block is a call only once it is
    complete and parses, so a malformed block stays text. Streamed (`forced=True`: a grammar made
    the output one well-formed call): the call is announced as soon as its head (`{"name": ...,
    "arguments": `) is in, and its arguments follow as they are generated. Either way a call's
    `arguments` are the text the model wrote for them, and a whole output parses into the same
    content and calls as its stream does.
    """

    def __init__(self, names: Iterable[str], parallel: bool = True, forced: bool = False) -> None:
        self.names = frozenset(names)
        self.parallel = parallel
        self.forced = forced
        self.calls = 0
        self._held = ""  # text not yet known to be content: a block, or what may start one
        self._streaming = False  # inside the arguments of a streamed call

    def push(self, text: str) -> list[Piece]:
        self._held += text
        pieces = []
        while True:
            if self._streaming:
                if not self._stream_arguments(pieces):
                    break
                continue
            start = self._held.find(CALL_START)
            if start < 0:
                keep = _partial(self._held, CALL_START)
                pieces.append(Piece(self._held[: len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep :]
                break
            pieces.append(Piece(self._held[:start]))
            self._held = self._held[start:]
            head = CALL_HEAD.match(self._held, len(CALL_START))
            # (a head at the very end of the text so far may not have all its whitespace yet)
            if self.forced and head and head.end() < len(self._held) and self._may_call(head.group(1)):
                self.calls += 1
                pieces.append(Piece(call=ParsedCall(_call_id(), head.group(1), "")))
                self._held, self._streaming = self._held[head.end() :], True
                continue
            end = self._held.find(CALL_END)
            if end < 0:
                break
            block, self._held = self._held[: end + len(CALL_END)], self._held[end + len(CALL_END) :]
            call = self._checked_call(block[len(CALL_START) : -len(CALL_END)])
            pieces.append(Piece(call=call) if call else Piece(block))
        return [p for p in pieces if p.content or p.call or p.arguments]

    def flush(self) -> list[Piece]:
        """The end of the output: what is held back is content (an unfinished block included), or
        the rest of the arguments of a streamed call that was cut short."""
        held, self._held = self._held, ""
        if self._streaming:
            self._streaming = False
            return [Piece(arguments=held)] if held else []
        return [Piece(held)] if held else []

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """A whole output: its content and its calls."""
        content, calls = [], []
        for piece in self.push(text) + self.flush():
            content.append(piece.content)
            if piece.call:
                calls.append(piece.call)
            elif piece.arguments:
                calls[-1].arguments += piece.arguments
        return "".join(content), calls

    def _stream_arguments(self, pieces: list[Piece]) -> bool:
        """Pass on the arguments of the streamed call, holding back what may be the end of its
        block (the object's closing brace, then the end marker). True once the block has ended."""
        end = self._held.find(CALL_END)
        if end < 0:
            keep = len(self._held) - _arguments_end(self._held[: len(self._held) - _partial(self._held, CALL_END)])
            pieces.append(Piece(arguments=self._held[: len(self._held) - keep]))
            self._held = self._held[len(self._held) - keep :]
            return False
        pieces.append(Piece(arguments=self._held[: _arguments_end(self._held[:end])]))
        self._held, self._streaming = self._held[end + len(CALL_END) :], False
        return True

    def _may_call(self, name: str) -> bool:
        return name in self.names and (self.parallel or not self.calls)

    def _checked_call(self, body: str) -> ParsedCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(value, dict) and isinstance(value.get("arguments"), dict) and self._may_call(value.get("name"))):
            return None
        self.calls += 1
        return ParsedCall(_call_id(), value["name"], _written_arguments(body, value["arguments"]))


def _written_arguments(body: str, arguments: dict) -> str:
    """The text of a call's arguments as the model wrote them in `body`, or (written otherwise:
    another key order, more keys) as JSON."""
    head = CALL_HEAD.match(body)
    if head:
        text = body[head.end() : _arguments_end(body)]
        try:
            if json.loads(text) == arguments:
                return text
        except ValueError:
            pass
    return json.dumps(arguments, ensure_ascii=False)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker` (held back: it may
    be the start of one)."""
    return max((n for n in range(len(marker) - 1, 0, -1) if text.endswith(marker[:n])), default=0)


def _arguments_end(text: str) -> int:
    """Where the arguments end in `text`, the rest of a call's object after its head: before the
    object's closing brace and the whitespace around it."""
    end = len(text.rstrip())
    if end and text[end - 1] == "}":
        end = len(text[: end - 1].rstrip())
    return end
