"""Checkpoint folders in the Hugging Face layout: PaliGemma and the SigLIP dual encoder, loaded and saved.

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. PaliGemma keys may use the hub's on-disk names
(`vision_tower.vision_model.…`, `language_model.model.…`) or the in-memory names of newer
`transformers` (`model.vision_tower.…`, `model.language_model.…`); both map to this project's module
names. Loading is strict. The model is built on the `meta` device and each tensor is read and cast on
its own, so no float32 copy of a bfloat16 model is ever made. A folder saved with int8 weights (see
`speed/quantize.py`) says so in `config.json` ("quantization") and holds `….weight` (int8) and `….scales`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from paligemma_cli.checkpoints.atomic import staged_folder
from paligemma_cli.checkpoints.safetensors_io import SafetensorsReader, summarize_names, weight_files, write_safetensors
from paligemma_cli.checkpoints.vae import VAE_FILENAME
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import ConfigFile, PaliGemmaConfig, SiglipConfig
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.model.siglip import DualEncoder
from paligemma_cli.model.skeleton import empty_skeleton
from paligemma_cli.outputs import mark_folder
from paligemma_cli.speed.quantize import (
    METHOD,
    is_quantized,
    marker,
    parse_quantize,
    quantize_model,
    quantize_per_channel,
)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json", "generation_config.json")
# Files that travel with the weights when a folder is fine-tuned or converted: the tokenizer's, and the
# VQ-VAE that `segment` decodes this model's <seg> tokens with.
COMPANION_FILES = (*TOKENIZER_FILES, VAE_FILENAME)

_RENAMES = [
    (re.compile(r"^model\."), ""),  # newer transformers' in-memory prefix
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^language_model\.model\."), "language_model."),
]
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


def check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PaliGemmaError(f"model folder '{folder}' does not exist")
    if not (folder / "config.json").exists():
        raise PaliGemmaError(f"'{folder}' is not a checkpoint folder: it has no config.json")
    return folder


def stored_quantization(folder: Path) -> str | None:
    """The quantization method named in a folder's `config.json` ("int8-weight-only"), or None."""
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


# A function that turns one file tensor into the entries of the state dict: (key, name, expected tensor,
# file dtype, the mapped file, a reader of the same file) -> {name: tensor}.
Take = Callable[[str, str, torch.Tensor, torch.dtype, object, SafetensorsReader], dict]


def read_state(folder: Path, expected: dict[str, torch.Tensor], rename: Callable[[str], str | None], take: Take,
               what: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint folder, strictly: every key of `expected` and no other.

    `rename` maps a file key to a state-dict name (None skips the key); each tensor's shape is checked
    against `expected` before `take` reads it. A missing or unexpected key is a one-line error naming
    `what` the folder should hold.
    """
    state, unexpected = {}, []
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as mapped, SafetensorsReader(file) as reader:
                for key in mapped.keys():
                    name = rename(key)
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
                    state.update(take(key, name, want, src_dtype, mapped, reader))
        except SafetensorError as e:
            raise PaliGemmaError(f"cannot read '{file}': {e}") from None
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = ([f"missing {summarize_names(missing)}"] if missing else []) + (
            [f"unexpected {summarize_names(sorted(unexpected))}"] if unexpected else [])
        raise PaliGemmaError(f"checkpoint '{folder}' does not match {what}: " + "; ".join(parts))
    return state


# --- PaliGemma ----------------------------------------------------------------------------------------------


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               quantize: str | None = None) -> PaliGemma:
    """Build a `PaliGemma` from a checkpoint folder, strictly, straight into `dtype` on `device`.

    The model is built on the `meta` device (no memory) and each tensor is taken from the file on its
    own: a tensor already in `dtype` on the CPU is used in place from the memory-mapped file (no copy;
    its pages are read when first used); any other is read into fresh memory, cast or moved, and its
    source freed before the next. Peak memory is therefore about the size of the weights in `dtype`,
    never a float32 copy of the whole model.

    `quantize="int8"` quantizes the decoder (see `speed/quantize.py`) tensor by tensor as it is read, so
    the float decoder never exists in memory. A folder saved quantized loads quantized whatever `quantize`
    says. `dtype` is the activation dtype; by default the checkpoint's.
    """
    folder = check_folder(path)
    cfg = PaliGemmaConfig.from_json(folder / "config.json")
    stored = stored_quantization(folder)
    quantize = parse_quantize(quantize)
    device = torch.device(device or "cpu")
    with empty_skeleton():
        model = PaliGemma(cfg)
        if stored or quantize:
            quantize_model(model)

    def take(key, name, want, src_dtype, mapped, reader) -> dict:
        nonlocal dtype
        if src_dtype.is_floating_point:
            dtype = dtype or src_dtype  # the first float tensor's, by default
        if want.dtype == torch.int8 and src_dtype.is_floating_point and not stored:
            # Quantizing at load: from the file's own precision, a few rows at a time.
            t, scales = _quantize_from_file(reader, key, dtype)
            return {name: t.to(device), name.removesuffix(".weight") + ".scales": scales.to(device)}
        if want.is_floating_point() != src_dtype.is_floating_point:
            wanted = "a float tensor" if want.is_floating_point() else "int8"
            hint = "" if stored else ("; config.json has no \"quantization\" entry, so the folder "
                                      "was not saved by `paligemma convert --quantize int8`")
            raise PaliGemmaError(f"'{key}' in {Path(reader.path).name} is {str(src_dtype).removeprefix('torch.')}, "
                                 f"the model expects {wanted}{hint}")
        if device.type == "cpu" and (src_dtype == dtype or not src_dtype.is_floating_point):
            t = mapped.get_tensor(key)  # used in place: no copy, pages read on first use
            if t.dtype == torch.int8 and t.data_ptr() % 64:
                t = reader.tensor(key)  # the CPU int8 kernel needs aligned weights
        else:
            # Cast or moved, so copied anyway: read into fresh memory, one tensor at a time,
            # rather than through the map, whose pages would stay resident until the end.
            t = reader.tensor(key, dtype if src_dtype.is_floating_point else None)
        return {name: t.to(device)}

    # A vision config that does not say `vision_use_head: false` (SigLIP's default is true) comes with the
    # tower's pooling head, which PaliGemma never uses: exactly those weights are passed over.
    with_head = ConfigFile.read_json(folder / "config.json").get("vision_config", {}).get("vision_use_head", True)
    head_keys = []

    def rename(key: str) -> str | None:
        name = canonical_key(key)
        if with_head and name is not None and name.startswith("vision_tower.head."):
            head_keys.append(key)
            return None
        return name

    state = read_state(folder, dict(model.state_dict()), rename, take, "a PaliGemma model")
    if head_keys:
        warnings.warn(f"'{folder}' holds a SigLIP pooling head ({len(head_keys)} vision_tower.head.* tensors) "
                      "that PaliGemma does not use; it is ignored")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _quantize_from_file(reader: SafetensorsReader, key: str, scales_dtype: torch.dtype):
    """int8 weight and scales of a float weight in the file, read and quantized a few MB at a time."""
    _, (n, k) = reader.info(key)
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=scales_dtype)
    for start, rows in reader.chunks(key):
        end = start + len(rows)
        quantize_per_channel(rows, scales_dtype, out=(q[start:end], scales[start:end]))
    return q, scales


def save_model(model: PaliGemma, folder: str | Path, tokenizer_dir: str | Path | None = None,
               extra_files: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a complete checkpoint folder atomically: it appears whole under its name, or not at all.

    An existing folder of the same name is replaced only after the new one is complete.
    """
    if any(getattr(m, "inference_only", False) for m in model.modules()):
        raise PaliGemmaError("this model's weights are packed for fast CPU inference and cannot be saved; "
                             "load it again without the fast layout to save it")
    folder = Path(folder)
    quantization = marker(model.dtype) if is_quantized(model) else None
    with staged_folder(folder) as tmp:
        _write_checkpoint_files(model.config, model.state_dict(), tmp, tokenizer_dir, extra_files, max_shard_bytes,
                                quantization=quantization)
        mark_folder(tmp, "checkpoint")  # so that `convert --force` may replace it later
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
        for name in COMPANION_FILES:
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


# --- SigLIP dual encoder (transformers' `SiglipModel` layout) -------------------------------------------------


def load_dual_encoder(path: str | Path, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> DualEncoder:
    """Load a `SiglipModel` folder (config.json + model.safetensors or shards), strictly.

    Keys are `vision_model.*`, `text_model.*`, `logit_scale`, `logit_bias`, optionally under `model.`.
    `dtype` defaults to the checkpoint's.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PaliGemmaError(f"model folder '{folder}' does not exist")
    cfg = SiglipConfig.from_json(folder / "config.json")
    with empty_skeleton():  # no memory until the real tensors arrive
        model = DualEncoder(cfg)

    def rename(key: str) -> str | None:
        name = key.removeprefix("model.")
        # An arange buffer some older transformers versions saved; rebuilt here.
        return None if name.endswith("embeddings.position_ids") else name

    state = read_state(folder, model.state_dict(), rename,
                       lambda key, name, want, src_dtype, mapped, reader: {name: mapped.get_tensor(key)},
                       "a SigLIP dual encoder")
    dtype = dtype or state["logit_scale"].dtype
    device = torch.device(device or "cpu")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_dual_encoder(model: DualEncoder, folder: str | Path) -> Path:
    """Write config.json + model.safetensors in `SiglipModel`'s layout, atomically."""
    folder = Path(folder)
    with staged_folder(folder) as tmp:
        model.config.save(tmp)
        write_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp)
        mark_folder(tmp, "checkpoint")
    return folder
