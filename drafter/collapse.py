"""CTC collapse: turn a sequence of CTC frames into the token sequence it stands for.

The CTC many-to-one map B (Graves et al., 2006) first merges runs of equal consecutive frames, then
drops blanks:  B("a a _ b b") = "a b",  B("a _ a") = "a a",  B("_ _") = "".  Equivalently, frame t
is emitted iff  x_t != blank  and  x_t != x_{t-1}  (x_{-1} is "nothing"), which is what the
batched version computes with one comparison against the shifted frames and one scatter.

Collapse is online: B(x[:t]) is always a prefix of B(x[:t+1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD = -1
"""Default pad value of `ctc_collapse`'s output (never a token id: token ids are >= 0)."""


def collapse_sequence(frames: Sequence[int], blank: int) -> list[int]:
    """B(frames) for one sequence: keep frame t iff it is not blank and differs from frame t-1."""
    out: list[int] = []
    prev: int | None = None
    for f in frames:
        if f != blank and f != prev:
            out.append(f)
        prev = f
    return out


def ctc_collapse(frames: torch.Tensor, blank: int, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched B(x): collapse each row of `frames` (B, N), vectorised over B and N.

    Returns `(tokens, lengths)`: `tokens` (B, N) holds row b's collapsed tokens left-aligned in
    `tokens[b, :lengths[b]]` and `pad` after them; `lengths` (B,) int64. Keeps the input's device.
    """
    if frames.dim() != 2:
        raise ValueError(f"frames must be (B, N), got shape {tuple(frames.shape)}")
    frames = frames.long()
    num_rows, num_frames = frames.shape
    prev = torch.roll(frames, shifts=1, dims=1)  # (B, N); column 0 is overridden below
    keep = (frames != blank) & (frames != prev)  # (B, N)
    if num_frames > 0:
        keep[:, 0] = frames[:, 0] != blank  # x_{-1} is "nothing": only a blank is dropped
    lengths = keep.sum(dim=1)  # (B,)
    # Kept frame t goes to column (number of kept frames before t); dropped frames go to an extra
    # trash column N, which is sliced off (their duplicate writes there do not matter).
    dest = torch.where(keep, keep.cumsum(dim=1) - 1, num_frames)  # (B, N)
    out = frames.new_full((num_rows, num_frames + 1), pad)  # (B, N + 1)
    out.scatter_(1, dest, frames)
    return out[:, :num_frames], lengths


def collapsed_to_lists(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """The rows of `ctc_collapse`'s output as Python lists, padding removed."""
    rows = tokens.tolist()
    return [row[:n] for row, n in zip(rows, lengths.tolist())]
