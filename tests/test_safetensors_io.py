"""The loader's chunked safetensors reader against safetensors' own: whole tensors, row and column
slices, every dtype a checkpoint uses, tensors larger than one read buffer, and damaged files."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.runtime import safetensors_io
from server.runtime.safetensors_io import ChunkedReader, SafetensorsError, read_header


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 4096)  # tensors span many reads
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(300, 24, generator=g).to(torch.bfloat16),
        "proj": torch.randn(40, 70, generator=g),
        "norm": torch.randn(24, generator=g).half(),
        "wide": torch.randn(2, 3000, generator=g),  # one row larger than the buffer
        "ids": torch.arange(50, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_whole_tensors_and_slices_match_safetensors(checkpoint):
    ref = load_file(str(checkpoint))
    infos = read_header(checkpoint)
    assert set(infos) == set(ref)
    with ChunkedReader(checkpoint) as reader:
        for name, tensor in ref.items():
            out = torch.empty(tensor.shape, dtype=torch.float32 if tensor.is_floating_point() else tensor.dtype)
            reader.copy_into(infos[name], out)
            assert torch.equal(out, tensor.to(out.dtype)), name
        rows = torch.empty(100, 24)
        reader.copy_into(infos["embed"], rows, dim=0, start=150, length=100)
        assert torch.equal(rows, ref["embed"][150:250].float())
        cols = torch.empty(40, 35)
        reader.copy_into(infos["proj"], cols, dim=1, start=35, length=35)
        assert torch.equal(cols, ref["proj"][:, 35:])
        fused = torch.zeros(80, 70)  # a part written into rows of a fused matrix
        reader.copy_into(infos["proj"], fused.narrow(0, 40, 40))
        assert torch.equal(fused[40:], ref["proj"]) and not fused[:40].any()


def test_a_wrong_shape_and_a_truncated_file_are_refused(checkpoint):
    infos = read_header(checkpoint)
    with ChunkedReader(checkpoint) as reader, pytest.raises(SafetensorsError, match="config implies"):
        reader.copy_into(infos["proj"], torch.empty(41, 70))
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) - 100])
    with ChunkedReader(checkpoint) as reader, pytest.raises(SafetensorsError, match="truncated"):
        last = max(read_header(checkpoint).values(), key=lambda i: i.offset)
        reader.copy_into(last, torch.empty(last.shape, dtype=last.dtype))
    checkpoint.write_bytes(b"\x01")
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        read_header(checkpoint)
