"""Incremental detokenization: multi-byte characters never split, stop strings across tokens."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import DEMO_MODEL


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def stream(tok, text: str, stop=(), step: int = 1) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, list(stop))
    pieces = [d.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(d.flush())
    return pieces, d


@pytest.mark.parametrize("step", [1, 2, 3])
def test_deltas_concatenate_to_the_full_text(tok, step):
    text = "Natalia sold 48/2 = 24 clips in May.\n\nSo she sold 48+24 = 72 clips. Ünïcödé: 日本語 🙂 — ok"
    pieces, _ = stream(tok, text, step=step)
    assert "".join(pieces) == tok.decode(tok.encode(text, add_special_tokens=False))


def test_multibyte_characters_are_never_split(tok):
    text = "🙂🙂 日本 é"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.replace(" ", "")), "test needs characters split over several byte tokens"
    pieces, _ = stream(tok, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize("step", [1, 4])
def test_stop_string_spanning_tokens_is_not_emitted(tok, step):
    text = "The answer is 72 clips.\n### Final answer: 72"
    pieces, d = stream(tok, text, stop=["### Final"], step=step)
    assert d.stopped
    assert "".join(pieces) == "The answer is 72 clips.\n"


def test_text_that_only_looks_like_a_stop_prefix_is_released(tok):
    pieces, d = stream(tok, "a #### b ## c", stop=["###x"])
    assert not d.stopped
    assert "".join(pieces) == "a #### b ## c"


def test_earliest_of_several_stop_strings_wins(tok):
    pieces, d = stream(tok, "one two three four", stop=["four", "two"])
    assert d.stopped and "".join(pieces) == "one "


def test_nothing_after_stop(tok):
    d = IncrementalDetokenizer(tok, ["STOP"])
    first = d.push(tok.encode("hello STOP world", add_special_tokens=False))
    assert first == "hello " and d.stopped
    assert d.push(tok.encode(" more", add_special_tokens=False)) == "" and d.flush() == ""
