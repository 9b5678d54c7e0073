"""Reading safetensors files tensor by tensor, straight into the dtype and device asked for.

A tensor kept as stored, on the CPU, is memory-mapped: nothing is read until it is used, and
the page cache holds it once however many processes load the file. A tensor that must be
converted or moved is converted from the mapping, and the pages it was read from are then
dropped from the process, so a float32 file loaded in float16 peaks at half the file plus
one tensor, not the mapped file plus its half-size copy.
"""

import json
import mmap
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read or does not fit the model."""


StateDict = dict[str, torch.Tensor]

STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                 "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: Path, device="cpu", dtype: torch.dtype | None = None,
                     skip: str | None = None, only: Callable[[list[str]], str] | None = None) -> StateDict:
    """Every tensor of `path` (but those whose key starts with `skip`; with `only`, just those
    starting with the prefix `only(keys)` picks), floating-point ones cast to `dtype`, all on
    `device`, one at a time, so no second copy of the model ever exists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    on_cpu = torch.device(device).type == "cpu"
    try:
        # safe_open checks the header and the file's length before anything is read.
        with safe_open(str(path), framework="pt", device="cpu") as mapped, path.open("rb") as raw, \
                mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_COPY) as pages:
            data_start, header = read_header(raw)
            keep = only(list(mapped.keys())) if only else ""
            out = {}
            for key in mapped.keys():
                if (skip and key.startswith(skip)) or not key.startswith(keep):
                    continue
                stored = STORED_DTYPES.get(header[key]["dtype"])
                if stored is None:
                    raise CheckpointError(f"{path}: {key}: unknown tensor type {header[key]['dtype']}")
                target = dtype if dtype and stored.is_floating_point else stored
                if on_cpu and target == stored:
                    out[key] = mapped.get_tensor(key)
                else:
                    out[key] = converted(pages, data_start, header[key], stored, device, target)
            return out
    except SafetensorError as e:
        hint = ("the file is truncated (an interrupted download?)" if "incomplete" in str(e)
                else "it is not a safetensors file (.ckpt pickles are not loaded, for safety)")
        raise CheckpointError(f"{path}: cannot read: {hint} [{e}]") from None


def read_header(f) -> tuple[int, dict]:
    """(where the tensor data starts, the JSON header): an 8-byte little-endian length, then JSON."""
    length = int.from_bytes(f.read(8), "little")
    return 8 + length, json.loads(f.read(length))


def converted(pages: mmap.mmap, data_start: int, entry: dict, stored: torch.dtype, device,
              dtype: torch.dtype) -> torch.Tensor:
    """One tensor converted to `dtype` on `device` straight from the mapped file; the pages it
    was read from are then dropped from the process (they stay in the page cache), where
    otherwise every page read would stay resident until the whole file is unmapped."""
    begin, end = (data_start + offset for offset in entry["data_offsets"])
    if begin == end:
        return torch.empty(entry["shape"], dtype=dtype, device=device)
    out = torch.frombuffer(pages, dtype=stored, count=(end - begin) // stored.itemsize, offset=begin)
    out = out.reshape(entry["shape"]).to(device, dtype)
    if hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
        first = begin // mmap.PAGESIZE * mmap.PAGESIZE
        pages.madvise(mmap.MADV_DONTNEED, first, end - first)  # a private, never written mapping: nothing lost
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The free-form `__metadata__` strings of a safetensors file's header."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata() or {}
