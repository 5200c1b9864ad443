"""Incremental detokenization: multi-byte characters never split, stop strings across tokens."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer, token_bytes
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


def test_token_bytes_of_a_byte_level_tokenizer_rebuild_the_text(tok):
    text = "Ünïcödé: 日本語 🙂 — ok"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = token_bytes(tok, ids)
    assert b"".join(pieces).decode() == text
    assert any(len(p) and not _utf8(p) for p in pieces)  # some tokens hold part of a character
    assert token_bytes(tok, [tok.eos_token_id]) == [tok.eos_token.encode()]


class _SentencePieceLike:
    """What token_bytes reads of a SentencePiece tokenizer with byte fallback (Llama 2, Mistral)."""

    pieces = {0: "\u2581Hello", 1: "<0xE2>", 2: "<0x80>", 3: "<0x94>", 4: "world", 5: "</s>"}

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids):  # only reached for pieces that are neither bytes nor word starts
        return "".join(self.pieces[i] for i in ids)


def test_token_bytes_of_sentencepiece_byte_fallback():
    assert token_bytes(_SentencePieceLike(), [0, 1, 2, 3, 4, 5]) == [b" Hello", b"\xe2", b"\x80", b"\x94", b"world",
                                                                    b"</s>"]


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False
