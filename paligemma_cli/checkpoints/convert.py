"""`paligemma convert`: turn one checkpoint into another checkpoint folder.

Three conversions, each ending in the Hugging Face folder layout:
- a big_vision `.npz` (the original JAX release) -> folder (`npz_convert` does the mapping);
- a folder -> the same weights in another dtype and/or sharded;
- a training run saved with `--lora-save adapter` -> its base model with the adapter folded in.
Each can also store the decoder in int8 (`quantize="int8"`, see `speed/quantize.py`): int8 weights and their
scales in the safetensors, and a "quantization" entry in `config.json` that `load_model` reads. Such a
folder loads only in this tool (transformers does not know the format).

Every result goes through `hf.save_model`, which writes a temporary sibling folder and renames
it: a conversion that fails half-way (disk full, Ctrl-C) never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from paligemma_cli.checkpoints.big_vision import load_npz
from paligemma_cli.checkpoints.hf import check_folder, load_model, save_model
from paligemma_cli.checkpoints.vae import is_vae_file, recast_vae
from paligemma_cli.device import DTYPES
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.lora import apply_lora, lora_state_dict, merge_lora
from paligemma_cli.outputs import check_output_folder, why
from paligemma_cli.processing.tokenizer import load_sentencepiece
from paligemma_cli.speed.quantize import is_quantized, parse_quantize, quantize_model

Progress = Callable[[str], None] | None

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name.lower() not in DTYPES:
        raise PaliGemmaError(f"unknown --dtype {name!r}: use fp32, bf16 or fp16")
    return DTYPES[name.lower()]


def parse_size(text: str | None) -> int | None:
    """'5GB' -> 5_000_000_000 (decimal units, as the hub's shard sizes); '500MiB' binary; '1234' bytes."""
    if text is None:
        return None
    m = _SIZE.match(text)
    if not m:
        raise PaliGemmaError(f"cannot read the size {text!r}: write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").lower().removesuffix("b")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise PaliGemmaError(f"--max-shard-size must be positive, got {text!r}")
    return size


# --- the three conversions --------------------------------------------------------------------------


def convert_npz(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
                tokenizer: str | Path | None = None, force: bool = False, max_shard_bytes: int | None = None,
                progress: Progress = None, quantize: str | None = None, **overrides) -> Path:
    """big_vision `.npz` -> checkpoint folder. `tokenizer`: a SentencePiece file, or a folder holding
    `tokenizer.model`; the npz carries none. `overrides`: see `npz_convert.infer_config`."""
    tokenizer_file = _tokenizer_file(tokenizer)
    dst = check_output_folder(dst, [src] + ([tokenizer_file] if tokenizer_file else []), force)
    _say(progress, f"reading {src}")
    model = load_npz(src, dtype=dtype, progress=progress, **overrides)
    _say(progress, describe_decoder(model.config.text))
    if tokenizer_file is not None:
        _check_tokenizer_fits(tokenizer_file, model.config.image_token_id)
    model = _maybe_quantize(model, quantize, progress)
    if tokenizer_file is None:
        _say(progress, "warning: no --tokenizer given; copy the checkpoint's SentencePiece file into the folder "
                       "as tokenizer.model before using it")
    with tempfile.TemporaryDirectory() as staging:
        tokenizer_dir = None
        if tokenizer_file is not None:
            # save_model copies tokenizer files by their standard names; the release calls it
            # paligemma_tokenizer.model.
            tokenizer_dir = Path(staging)
            shutil.copyfile(tokenizer_file, tokenizer_dir / "tokenizer.model")
        return _save(model, dst, progress, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)


def recast_folder(src: str | Path, dst: str | Path, dtype: torch.dtype | None, max_shard_bytes: int | None = None,
                  force: bool = False, progress: Progress = None, quantize: str | None = None) -> Path:
    """Checkpoint folder -> the same weights in `dtype` (None keeps them), optionally sharded and/or int8.

    Quantizing happens while the weights are read, tensor by tensor from the memory-mapped file: the
    float model is never held whole (see `load_model`)."""
    src = check_folder(src)
    dst = check_output_folder(dst, [src], force)
    _say(progress, f"reading {src}" + (" and quantizing its decoder to int8" if quantize else ""))
    model = load_model(src, dtype=dtype, quantize=quantize)
    return _save(model, dst, progress, tokenizer_dir=src, max_shard_bytes=max_shard_bytes)


def merge_lora_folder(adapter_folder: str | Path, dst: str | Path, base: str | Path | None = None,
                      dtype: torch.dtype | None = None, max_shard_bytes: int | None = None, force: bool = False,
                      progress: Progress = None, quantize: str | None = None) -> Path:
    """A run saved with `--lora-save adapter` -> a plain model folder with the adapter folded in.

    The base is the folder named in `adapter_config.json` unless `base` is given. The result keeps the
    base's dtype unless `dtype` is given.
    """
    adapter_folder = Path(adapter_folder).expanduser()
    config_file, weights_file = adapter_folder / "adapter_config.json", adapter_folder / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise PaliGemmaError(f"'{adapter_folder}' has no adapter_config.json and adapter_model.safetensors: "
                             "it is not a LoRA adapter (train with --lora-save adapter)")
    try:
        adapter_cfg = json.loads(config_file.read_text())
        r, alpha, targets = adapter_cfg["r"], adapter_cfg["alpha"], tuple(adapter_cfg["target_modules"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PaliGemmaError(f"'{config_file}' is not a valid adapter config ({e})") from None
    base = base or adapter_cfg.get("base_model")
    if not base or not Path(base).expanduser().is_dir():
        raise PaliGemmaError(f"the adapter's base model {str(base)!r} is not a folder here; pass --base FOLDER")
    base = check_folder(base)
    dst = check_output_folder(dst, [adapter_folder, base], force)

    _say(progress, f"reading base model {base}")
    model = load_model(base)
    if is_quantized(model):
        raise PaliGemmaError(f"the base model {base} is int8: merge the adapter into the float base it was "
                             "trained on, then add --quantize int8 to this command")
    out_dtype = dtype or model.dtype
    # Fold in float32 so that the small update is not lost to rounding before the final cast.
    model = model.float()
    apply_lora(model, r, alpha, targets)
    try:
        adapter = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise PaliGemmaError(f"cannot read '{weights_file}': {e}") from None
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
    if missing or unexpected:
        raise PaliGemmaError(f"'{weights_file}' does not fit the base model {base} (r={r}, targets "
                             f"{', '.join(targets)}): missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(adapter, strict=False)
    merge_lora(model).to(out_dtype)
    _say(progress, f"merged {len(expected) // 2} adapters")
    model = _maybe_quantize(model, quantize, progress)
    tokenizer_dir = adapter_folder if (adapter_folder / "tokenizer.model").exists() else base
    return _save(model, dst, progress, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, merge_lora: bool = False,
            base: str | Path | None = None, tokenizer: str | Path | None = None, max_shard_size: str | None = None,
            force: bool = False, progress: Progress = None, quantize: str | None = None, **overrides) -> Path:
    """Pick the conversion from what SRC is; what the `convert` command calls."""
    src = Path(src).expanduser()
    torch_dtype, shard, quantize = parse_dtype(dtype), parse_size(max_shard_size), parse_quantize(quantize)
    gemma2_options = {k: v for k, v in overrides.items() if v is not None}
    if not src.exists():
        raise PaliGemmaError(f"'{src}' does not exist")
    if src.is_file():
        if merge_lora or base:
            raise PaliGemmaError("--merge-lora and --base take a training run folder, not a file")
        if is_vae_file(src):  # the segmentation VQ-VAE: a file in, a file out
            if tokenizer or shard or quantize or gemma2_options:
                raise PaliGemmaError("a VQ-VAE file converts to another dtype only (--dtype fp32 or fp16)")
            _say(progress, f"reading the VQ-VAE {src}")
            return recast_vae(src, dst, dtype, force)
        return convert_npz(src, dst, dtype=torch_dtype, tokenizer=tokenizer, force=force, max_shard_bytes=shard,
                           progress=progress, quantize=quantize, **gemma2_options)
    if gemma2_options or tokenizer:
        given = ", ".join(f"--{k.replace('_', '-')}" for k in [*gemma2_options, *(["tokenizer"] if tokenizer else [])])
        raise PaliGemmaError(f"{given} only apply when converting a big_vision .npz file")
    if merge_lora:
        return merge_lora_folder(src, dst, base=base, dtype=torch_dtype, max_shard_bytes=shard, force=force,
                                 progress=progress, quantize=quantize)
    if base:
        raise PaliGemmaError("--base goes with --merge-lora")
    has_weights = (src / "model.safetensors").exists() or (src / "model.safetensors.index.json").exists()
    if (src / "adapter_config.json").exists() and not has_weights:
        raise PaliGemmaError(f"'{src}' holds a LoRA adapter: add --merge-lora to fold it into its base model")
    return recast_folder(src, dst, torch_dtype, max_shard_bytes=shard, force=force, progress=progress,
                         quantize=quantize)


# --- helpers ------------------------------------------------------------------------------------------------


def _say(progress: Progress, message: str) -> None:
    if progress:
        progress(message)


def _maybe_quantize(model, quantize: str | None, progress: Progress):
    """For the conversions that hold a float model anyway (.npz, merged LoRA): quantize it module by module."""
    if not quantize:
        return model
    _say(progress, "quantizing the decoder to int8")
    return quantize_model(model)


def describe_decoder(t) -> str:
    """The settings a converted Gemma 2 decoder runs with, for the user to see (big_vision's unless given)."""
    if not t.is_gemma2:
        return "decoder: Gemma 1"
    return (f"decoder: Gemma 2, attention soft-cap {t.attn_logit_softcapping or 'off'}, final soft-cap "
            f"{t.final_logit_softcapping or 'off'}, sliding window {t.sliding_window or 'off'}, "
            f"query scale {t.query_pre_attn_scalar}^-1/2")


def _check_tokenizer_fits(path: Path, image_token_id: int) -> None:
    """The tokenizer must be a SentencePiece model whose `<image>` id (its piece count) is the checkpoint's."""
    pieces = load_sentencepiece(path).get_piece_size()
    if pieces != image_token_id:
        raise PaliGemmaError(f"tokenizer '{path}' has {pieces} pieces, so its <image> would be id {pieces}, but "
                             f"the checkpoint's is {image_token_id}: it is not this model's tokenizer")


def _tokenizer_file(tokenizer: str | Path | None) -> Path | None:
    if tokenizer is None:
        return None
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise PaliGemmaError(f"tokenizer '{path}' does not exist; pass the SentencePiece .model file")
    load_sentencepiece(path)  # a one-line error now, not a folder that fails to load later
    return path


def _save(model, dst: Path, progress: Progress, **kwargs) -> Path:
    # The state dict, not parameters(): an int8 model keeps its weights and scales as buffers.
    state = model.state_dict()
    n = sum(t.numel() for k, t in state.items() if not k.endswith(".scales"))
    size = sum(t.numel() * t.element_size() for t in state.values())
    kind = str(model.dtype).split(".")[-1] + (", decoder int8" if is_quantized(model) else "")
    _say(progress, f"writing {dst} ({n / 1e6:.1f}M parameters, {size / 1e9:.2f} GB, {kind})")
    try:
        return save_model(model, dst, **kwargs)
    except OSError as e:
        # save_model has already removed its temporary folder; say so, since that is what the user asks next.
        raise PaliGemmaError(f"could not write '{dst}': {why(e)} (needs about {size / 1e9:.2f} GB); "
                             "nothing was written") from None
