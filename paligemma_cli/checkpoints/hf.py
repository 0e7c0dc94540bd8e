"""Reading and writing checkpoint folders in the Hugging Face layout.

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Keys may use the hub's on-disk names
(`vision_tower.vision_model.…`, `language_model.model.…`) or the in-memory names of newer
`transformers` (`model.vision_tower.…`, `model.language_model.…`); both map to this project's module
names. Loading is strict. The model is built on the `meta` device and each tensor is read and cast on
its own, so no float32 copy of a bfloat16 model is ever made. A folder saved with int8 weights (see
`core.quantize`) says so in `config.json` ("quantization") and holds `….weight` (int8) and `….scales`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.skeleton import empty_skeleton
from paligemma_cli.errors import PaliGemmaError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json", "generation_config.json")

_RENAMES = [
    (re.compile(r"^model\."), ""),  # newer transformers' in-memory prefix
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^language_model\.model\."), "language_model."),
]
READ_CHUNK_ELEMENTS = 1 << 22  # tensors that are cast or quantized while loading are read this much at a time
_TIED_HEAD = re.compile(r"^(language_model\.)?(model\.)?lm_head\.weight$")


def canonical_key(key: str) -> str | None:
    """This project's name for a checkpoint key, or None for the tied output head (not stored here)."""
    if _TIED_HEAD.match(key):
        return None
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def hub_key(key: str) -> str:
    """The hub's on-disk name for one of this project's keys (what every transformers version loads)."""
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    if key.startswith("language_model."):
        return "language_model.model." + key[len("language_model."):]
    return key


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


def check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PaliGemmaError(f"model folder '{folder}' does not exist")
    if not (folder / "config.json").exists():
        raise PaliGemmaError(f"'{folder}' is not a checkpoint folder: it has no config.json")
    return folder


def stored_quantization(folder: Path) -> str | None:
    """The quantization method named in a folder's `config.json` ("int8-weight-only"), or None."""
    from paligemma_cli.speed.quantize import METHOD

    try:
        q = json.loads((folder / "config.json").read_text()).get("quantization")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # PaliGemmaConfig.from_json has already said what is wrong with the file
    if q is None:
        return None
    method = q.get("method") if isinstance(q, dict) else q
    if method != METHOD:
        raise PaliGemmaError(f"'{folder}' is quantized as {method!r}, which this version cannot load "
                             f"(it reads {METHOD!r})")
    return method


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               quantize: str | None = None):
    """Build a `PaliGemma` from a checkpoint folder, strictly, straight into `dtype` on `device`.

    The model is built on the `meta` device (no memory) and each tensor is taken from the file on its
    own: a tensor already in `dtype` on the CPU is used in place from the memory-mapped file (no copy;
    its pages are read when first used); any other is read into fresh memory, cast or moved, and its
    source freed before the next. Peak memory is therefore about the size of the weights in `dtype`,
    never a float32 copy of the whole model.

    `quantize="int8"` quantizes the decoder (see `core.quantize`) tensor by tensor as it is read, so the
    float decoder never exists in memory. A folder saved quantized loads quantized whatever `quantize` says.
    `dtype` is the activation dtype; by default the checkpoint's.
    """
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.speed.quantize import parse_quantize, quantize_model

    folder = check_folder(path)
    cfg = PaliGemmaConfig.from_json(folder / "config.json")
    stored = stored_quantization(folder)
    quantize = parse_quantize(quantize)
    device = torch.device(device or "cpu")
    with empty_skeleton():
        model = PaliGemma(cfg)
        if stored or quantize:
            quantize_model(model)
    expected = dict(model.state_dict())

    state, unexpected = {}, []
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as mapped, _FileReader(file) as reader:
                for key in mapped.keys():
                    name = canonical_key(key)
                    if name is None:
                        continue
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    want, (src_dtype, shape) = expected[name], reader.info(key)
                    if shape != tuple(want.shape):
                        raise PaliGemmaError(
                            f"'{key}' in {file.name} has shape {shape}, the config says "
                            f"{tuple(want.shape)}: config.json and weights do not match"
                        )
                    if src_dtype.is_floating_point:
                        dtype = dtype or src_dtype
                    if want.dtype == torch.int8 and src_dtype.is_floating_point and not stored:
                        # Quantizing at load: from the file's own precision, a few rows at a time.
                        t, scales = _quantize_from_file(reader, key, dtype)
                        state[name.removesuffix(".weight") + ".scales"] = scales.to(device)
                    elif want.is_floating_point() != src_dtype.is_floating_point:
                        wanted = "a float tensor" if want.is_floating_point() else "int8"
                        hint = "" if stored else ("; config.json has no \"quantization\" entry, so the folder "
                                                  "was not saved by `paligemma convert --quantize int8`")
                        raise PaliGemmaError(f"'{key}' in {file.name} is {str(src_dtype).removeprefix('torch.')}, "
                                             f"the model expects {wanted}{hint}")
                    elif device.type == "cpu" and (src_dtype == dtype or not src_dtype.is_floating_point):
                        t = mapped.get_tensor(key)  # used in place: no copy, pages read on first use
                        if t.dtype == torch.int8 and t.data_ptr() % 64:
                            t = reader.tensor(key)  # the CPU int8 kernel needs aligned weights
                    else:
                        # Cast or moved, so copied anyway: read into fresh memory, one tensor at a time,
                        # rather than through the map, whose pages would stay resident until the end.
                        t = reader.tensor(key, dtype if src_dtype.is_floating_point else None)
                    state[name] = t.to(device)
        except SafetensorError as e:
            raise PaliGemmaError(f"cannot read '{file}': {e}") from None
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(sorted(unexpected))}")
        raise PaliGemmaError(f"checkpoint '{folder}' does not match a PaliGemma model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _FileReader:
    """Reads tensors (or rows of them) of a safetensors file with plain reads into fresh memory.

    For the tensors that are copied anyway (cast, moved, quantized or realigned): read through the
    memory map instead, their pages would stay resident, and counted in the process's memory, for as
    long as any tensor of the file is in use. Fresh CPU tensors are also 64-byte aligned.
    """

    _DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
               "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
               "F64": torch.float64}

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        n = int.from_bytes(self._file.read(8), "little")
        self._header = json.loads(self._file.read(n))
        self._data_start = 8 + n

    def __enter__(self) -> "_FileReader":
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


def _quantize_from_file(reader: _FileReader, key: str, scales_dtype: torch.dtype):
    """int8 weight and scales of a float weight in the file, read and quantized a few MB at a time."""
    from paligemma_cli.speed.quantize import quantize_per_channel

    _, (n, k) = reader.info(key)
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=scales_dtype)
    for start, rows in reader.chunks(key):
        end = start + len(rows)
        quantize_per_channel(rows, scales_dtype, out=(q[start:end], scales[start:end]))
    return q, scales


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def save_model(model, folder: str | Path, tokenizer_dir: str | Path | None = None,
               extra_files: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a complete checkpoint folder atomically: it appears whole under its name, or not at all.

    Files are written into a temporary sibling folder which is then renamed; an existing folder of the
    same name is replaced only after the new one is complete.
    """
    from paligemma_cli.speed.packed_linear import is_packed

    if is_packed(model):
        raise PaliGemmaError("this model's weights are packed for fast CPU inference and cannot be saved; "
                             "load it again without `use_fast_cpu_layout` to save it")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder should not be
    try:
        _write_checkpoint_files(model.config, model.state_dict(), tmp, tokenizer_dir, extra_files, max_shard_bytes,
                                quantization=_quantization_marker(model))
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_state_dict_folder(config, state: dict[str, torch.Tensor], folder: str | Path,
                           tokenizer_dir: str | Path | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Update the model files inside an existing folder (a training run's), each file replaced atomically.

    Other files in the folder (metrics, resume state) are left alone. The weights are moved in last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=folder))
    try:
        _write_checkpoint_files(config, state, tmp, tokenizer_dir, extra_files, None)
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n.endswith(".safetensors")):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _quantization_marker(model) -> dict | None:
    from paligemma_cli.speed.quantize import is_quantized, marker

    return marker(model.dtype) if is_quantized(model) else None


def _write_checkpoint_files(config, state, folder: Path, tokenizer_dir, extra_files, max_shard_bytes,
                            quantization: dict | None = None) -> None:
    config.save(folder)
    if quantization is not None:
        # Unknown keys are ignored by PaliGemmaConfig (and by transformers, which reads "quantization_config").
        d = json.loads((folder / "config.json").read_text())
        d["quantization"] = quantization
        (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    write_safetensors({hub_key(k): v.detach().contiguous() for k, v in state.items()}, folder, max_shard_bytes)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir, name)
            if src.exists() and src.resolve() != (folder / name).resolve():
                shutil.copy2(src, folder / name)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def load_vision_tower_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The SigLIP vision tower weights (no pooling head) of a PaliGemma or SigLIP checkpoint folder."""
    folder = check_folder(path)
    prefixes = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.", "vision_model.")
    state = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        name = key[len(prefix):]
                        if not name.startswith("head."):
                            state[name] = f.get_tensor(key)
                        break
    if not state:
        raise PaliGemmaError(f"'{folder}' holds no vision tower weights")
    return state


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


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`, swapping out an existing `target` with no moment where neither is whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
