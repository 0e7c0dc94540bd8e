"""Reading and writing checkpoint folders in the Hugging Face layout.

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Keys may use the hub's on-disk names
(`vision_tower.vision_model.…`, `language_model.model.…`) or the in-memory names of newer
`transformers` (`model.vision_tower.…`, `model.language_model.…`); both map to this project's module
names. Loading is strict. The model is built on the `meta` device and each tensor is read and cast on
its own, so no float32 copy of a bfloat16 model is ever made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from paligemma_cli.core.config import PaliGemmaConfig
from paligemma_cli.core.errors import PaliGemmaError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json", "generation_config.json")

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


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """Build a `PaliGemma` from a checkpoint folder, strictly, straight into `dtype` on `device`."""
    from paligemma_cli.core.paligemma import PaliGemma

    folder = check_folder(path)
    cfg = PaliGemmaConfig.from_json(folder / "config.json")
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = PaliGemma(cfg)
    expected = dict(model.state_dict())

    state, unexpected = {}, []
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = canonical_key(key)
                    if name is None:
                        continue
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[name].shape):
                        raise PaliGemmaError(
                            f"'{key}' in {file.name} has shape {tuple(t.shape)}, the config says "
                            f"{tuple(expected[name].shape)}: config.json and weights do not match"
                        )
                    if t.is_floating_point():
                        dtype = dtype or t.dtype
                        t = t.to(dtype)  # one tensor at a time: never a float32 copy of the whole model
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


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def save_model(model, folder: str | Path, tokenizer_dir: str | Path | None = None,
               extra_files: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a complete checkpoint folder atomically: it appears whole under its name, or not at all.

    Files are written into a temporary sibling folder which is then renamed; an existing folder of the
    same name is replaced only after the new one is complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder should not be
    try:
        _write_checkpoint_files(model.config, model.state_dict(), tmp, tokenizer_dir, extra_files, max_shard_bytes)
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


def _write_checkpoint_files(config, state, folder: Path, tokenizer_dir, extra_files, max_shard_bytes) -> None:
    config.save(folder)
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
