"""CTC collapse: table tests for the one-sequence helper and the batched torch version."""

from __future__ import annotations

import random

import pytest
import torch

from drafter.collapse import PAD, collapse_sequence, collapsed_to_lists, ctc_collapse

B = 9  # blank id used in the tables

CASES = [
    # (frames, collapsed)
    ([1, 1, B, 2, 2], [1, 2]),  # "a a _ b b" -> "a b"
    ([1, B, 1], [1, 1]),  # blank between repeats keeps both
    ([1, 1, 1, 1], [1]),  # repeats merge
    ([B, B, B, B], []),  # all blank
    ([B, 1, B, B, 1, 1, B], [1, 1]),
    ([1, 2, 1, 2], [1, 2, 1, 2]),  # no merges
    ([B, 3, 3, B, 3, 4], [3, 3, 4]),
    ([0, 0, B, 0], [0, 0]),  # token id 0 is a real token
    ([5], [5]),
    ([B], []),
]


@pytest.mark.parametrize("frames, expected", CASES)
def test_collapse_sequence(frames: list[int], expected: list[int]) -> None:
    assert collapse_sequence(frames, blank=B) == expected


def test_ctc_collapse_batched_table() -> None:
    width = 7
    rows = [f + [B] * (width - len(f)) for f, _ in CASES]  # trailing blanks change nothing
    tokens, lengths = ctc_collapse(torch.tensor(rows), blank=B)
    assert tokens.shape == (len(CASES), width) and tokens.dtype == torch.long
    assert lengths.tolist() == [len(e) for _, e in CASES]
    for row, (_, expected) in zip(tokens.tolist(), CASES):
        assert row == expected + [PAD] * (width - len(expected))  # left-aligned, padded after
    assert collapsed_to_lists(tokens, lengths) == [e for _, e in CASES]


def test_ctc_collapse_custom_pad_and_blank_zero() -> None:
    tokens, lengths = ctc_collapse(torch.tensor([[0, 4, 4, 0, 4], [0, 0, 0, 0, 0]]), blank=0, pad=-7)
    assert tokens.tolist() == [[4, 4, -7, -7, -7], [-7] * 5]
    assert lengths.tolist() == [2, 0]


def test_ctc_collapse_first_frame_not_merged_with_last() -> None:
    # torch.roll wraps around: the last frame must not be treated as frame 0's predecessor.
    tokens, lengths = ctc_collapse(torch.tensor([[3, B, 3]]), blank=B)
    assert collapsed_to_lists(tokens, lengths) == [[3, 3]]
    tokens, lengths = ctc_collapse(torch.tensor([[3, 2, 3]]), blank=B)
    assert collapsed_to_lists(tokens, lengths) == [[3, 2, 3]]


def test_ctc_collapse_empty_shapes() -> None:
    tokens, lengths = ctc_collapse(torch.zeros(3, 0, dtype=torch.long), blank=B)
    assert tokens.shape == (3, 0) and lengths.tolist() == [0, 0, 0]
    tokens, lengths = ctc_collapse(torch.zeros(0, 4, dtype=torch.long), blank=B)
    assert tokens.shape == (0, 4) and lengths.shape == (0,)


def test_ctc_collapse_matches_reference_on_random_rows() -> None:
    rng = random.Random(0)
    rows = [[rng.choice([0, 1, 2, B]) for _ in range(6)] for _ in range(200)]
    tokens, lengths = ctc_collapse(torch.tensor(rows), blank=B)
    assert collapsed_to_lists(tokens, lengths) == [collapse_sequence(r, B) for r in rows]


def test_ctc_collapse_rejects_1d() -> None:
    with pytest.raises(ValueError):
        ctc_collapse(torch.tensor([1, 2]), blank=B)
