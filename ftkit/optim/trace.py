"""Trajectory files of zeroth-order runs (`<run>/trace.ftz`): with the recipe, enough to rebuild the fine-tuned
weights from the base model without a forward pass (`ftkit replay`).

Layout: the magic b"FTKZOTR1", a little-endian uint32 header length, a UTF-8 JSON header, then one fixed-size
record per step: step (uint32), step seed (uint64), learning rate (float64), the n projected gradients (float64)
and the rounding stream ids of Q1, Q2 and the update (3 x uint8). The header holds the layout's `version`, the
method's settings (ftkit.optim.core) and the step-0 values of tensors a forward pass computed (the prototype head),
base64-encoded, so replay needs none. A header of another version is refused, not read into other weights.

Records are appended as steps finish and flushed with every checkpoint; a resumed run truncates the file to its
checkpoint's step, so the trace always describes exactly the weights of the run's latest step.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import torch

from ftkit.safe_files import open_file, read_bytes

MAGIC = b"FTKZOTR1"
VERSION = 2  # of the header's layout and of how the recorded steps draw their numbers


def record_format(n_queries: int) -> struct.Struct:
    return struct.Struct(f"<IQd{n_queries}d3B")


def encode_tensor(t: torch.Tensor) -> dict:
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode()}


def decode_tensor(entry: dict) -> torch.Tensor:
    dtype = getattr(torch, entry["dtype"])
    raw = bytearray(base64.b64decode(entry["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(entry["shape"]).clone()


class TraceWriter:
    def __init__(self, path: Path, header: dict, resume_step: int | None = None):
        self.path, self.header = Path(path), header
        self.record = record_format(header["n_queries"])
        if resume_step is None:
            self.file = open_file(self.path, "wb")
            self.file.write(header_bytes(header))
        else:
            if not self.path.is_file():
                raise ValueError(f"{self.path} is missing")
            self.file = open_file(self.path, "r+b")
            try:
                start = _header_size(self.file)
                keep = start + resume_step * self.record.size
                self.file.seek(len(MAGIC) + 4)
                written = json.loads(self.file.read(start - len(MAGIC) - 4))
                if not isinstance(written, dict) or written.get("version") != VERSION:
                    raise ValueError(f"{self.path} is not a version {VERSION} trace, the version this ftkit writes")
                if os.fstat(self.file.fileno()).st_size < keep:
                    raise ValueError(f"{self.path} holds fewer than the checkpoint's {resume_step} steps")
            except ValueError:
                self.file.close()
                raise
            self.file.truncate(keep)
            self.file.seek(0, os.SEEK_END)

    def write(self, step: int, seed: int, lr: float, gradients: list[float], streams: tuple[int, int, int]) -> None:
        self.file.write(self.record.pack(step, seed, lr, *gradients, *streams))

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            self.flush()
            self.file.close()


def header_bytes(header: dict) -> bytes:
    """The start of a trace file: the magic, the header's length, the header as JSON."""
    blob = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob


def _header_size(f) -> int:
    f.seek(0)
    start = f.read(len(MAGIC) + 4)
    if start[: len(MAGIC)] != MAGIC or len(start) < len(MAGIC) + 4:
        raise ValueError("not an ftkit trace (bad magic)")
    (length,) = struct.unpack("<I", start[len(MAGIC):])
    return len(MAGIC) + 4 + length


# Header keys replay reads, and their types.
HEADER_KEYS = {"n_queries": int, "num_classes": int, "recipe": dict, "initial_tensors": dict, "environment": dict}


def read_trace(path: Path) -> tuple[dict, list[dict]]:
    """(header, records). Raises ValueError naming the problem for a damaged or foreign file."""
    data = read_bytes(Path(path))
    start = len(MAGIC) + 4
    if data[: len(MAGIC)] != MAGIC or len(data) < start:
        raise ValueError(f"{path} is not an ftkit trace (it does not start with {MAGIC.decode()})")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    if start + length > len(data):
        raise ValueError(f"{path} is truncated: its header needs {length:,} bytes and {len(data) - start:,} follow")
    try:
        header = json.loads(data[start : start + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} is a version {header.get('version')} trace and this ftkit reads version {VERSION}: "
                         f"replay it with the ftkit that wrote it")
    for key, kind in HEADER_KEYS.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ValueError(f"{path}: the header's {key} is missing or not a {kind.__name__}")
    n = header["n_queries"]
    if not 1 <= n <= 4096:
        raise ValueError(f"{path}: the header's n_queries is {n}")
    record = record_format(n)
    body = data[start + length :]
    if len(body) % record.size:
        raise ValueError(f"{path}: truncated record at the end ({len(body) % record.size} stray bytes)")
    records = []
    for values in record.iter_unpack(body):
        records.append({"step": values[0], "seed": values[1], "lr": values[2], "gradients": list(values[3 : 3 + n]),
                        "streams": tuple(values[3 + n :])})
    return header, records
