"""Safetensors files: which ones a checkpoint folder holds, reading tensors with plain reads, writing shards.

`safetensors.safe_open` maps a file and hands out tensors that are views of the mapping: ideal for weights
used as they are. `SafetensorsReader` is for the others (cast, moved, quantized or realigned): it reads
into fresh memory, a few MB at a time where asked, so the mapping's pages never pile up in the process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from paligemma_cli.errors import PaliGemmaError

READ_CHUNK_ELEMENTS = 1 << 22  # tensors that are cast or quantized while loading are read this much at a time


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise PaliGemmaError(f"'{index}' is not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise PaliGemmaError(f"'{folder}' is incomplete: shard(s) {', '.join(missing)} missing; download it again")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise PaliGemmaError(f"'{folder}' has no model.safetensors (nor a model.safetensors.index.json)")


class SafetensorsReader:
    """Reads tensors (or rows of them) of a safetensors file with plain reads into fresh memory.

    For the tensors that are copied anyway (cast, moved, quantized or realigned): read through the
    memory map instead, their pages would stay resident, and counted in the process's memory, for as
    long as any tensor of the file is in use. Fresh CPU tensors are also 64-byte aligned.
    """

    _DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
               "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
               "F64": torch.float64}

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(path, "rb")
        n = int.from_bytes(self._file.read(8), "little")
        self._header = json.loads(self._file.read(n))
        self._data_start = 8 + n

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._header[key]
        if entry["dtype"] not in self._DTYPES:
            raise PaliGemmaError(f"'{key}' has dtype {entry['dtype']}, which this tool does not read")
        return self._DTYPES[entry["dtype"]], tuple(entry["shape"])

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, in `dtype` if given: cast a few MB at a time, never whole in the file's dtype."""
        src_dtype, shape = self.info(key)
        if dtype is None or dtype == src_dtype or not shape:
            out = self._read_into(torch.empty(shape, dtype=src_dtype), self._header[key]["data_offsets"][0])
            return out if dtype is None else out.to(dtype)
        out = torch.empty(shape, dtype=dtype)
        for start, rows in self.chunks(key):
            out[start:start + len(rows)] = rows
        return out

    def chunks(self, key: str, elements: int | None = None):
        """Yield (start, rows): the tensor along its first axis, about `elements` at a time, read into one
        reused buffer (valid until the next step). Reusing it keeps the heap from fragmenting."""
        src_dtype, shape = self.info(key)
        n, row = shape[0], math.prod(shape[1:])
        step = max(1, (elements or READ_CHUNK_ELEMENTS) // max(row, 1))
        buffer = torch.empty((min(step, n), *shape[1:]), dtype=src_dtype)
        offset = self._header[key]["data_offsets"][0]
        for start in range(0, n, step):
            rows = buffer[: min(step, n - start)]
            yield start, self._read_into(rows, offset + start * row * buffer.element_size())

    def _read_into(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        self._file.seek(self._data_start + offset)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        if self._file.readinto(buffer) != buffer.nbytes:
            raise PaliGemmaError(f"'{self._file.name}' is truncated: download or convert it again")
        return out


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None = None) -> None:
    """One `model.safetensors`, or shards plus `model.safetensors.index.json` past `max_shard_bytes`."""
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(state, str(folder / "model.safetensors"), metadata=meta)
        return
    shards, current, size = [], {}, 0
    for key in sorted(state):
        n = state[key].numel() * state[key].element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def summarize_names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
