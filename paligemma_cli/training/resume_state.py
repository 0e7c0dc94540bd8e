"""What `--resume` needs beside a run's checkpoint, stored without pickle.

A run folder is something people download and share, so nothing read from it may run code. The state is
two files: `trainer_state-<step>.safetensors` (the trained weights, the optimizer's tensors, torch's RNG
state) and `trainer_state.json` (everything else, and the name of that tensor file). The JSON is written
last and names the tensor file of the same step: it is the commit. A save that fails part-way (a full
disk, a kill) leaves the previous JSON pointing at the previous, still present, tensor file, so a state
is complete or absent, never half. Older runs' `trainer_state.pt` is still read, with
`torch.load(weights_only=True)`, which refuses anything but plain tensors and containers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from paligemma_cli.checkpoints.atomic import atomic_save_tensors
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.outputs import atomic_write_text

STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
FORMAT = 1


def has_state(out: Path) -> bool:
    return (out / STATE_JSON).is_file() or (out / LEGACY_STATE).is_file()


def save_state(out: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict, info: dict) -> None:
    """Write the resume state of `step`: `weights` (name -> tensor), an optimizer `state_dict()`, the RNG
    states, and `info` (plain JSON: counters, settings)."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    opt_state = {}
    for index, entries in optimizer["state"].items():
        plain = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain[key] = value
        opt_state[str(index)] = plain
    tensors["rng/torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    name = f"trainer_state-{step:08d}.safetensors"
    atomic_save_tensors(tensors, out / name)
    record = {"format": FORMAT, "step": step, "tensors": name, **info,
              "optimizer": {"param_groups": optimizer["param_groups"], "state": opt_state},
              "python_rng": [version, list(internal), gauss]}
    atomic_write_text(out / STATE_JSON, json.dumps(record) + "\n")
    for old in out.glob("trainer_state-*.safetensors"):  # the committed state no longer needs them
        if old.name != name:
            old.unlink(missing_ok=True)
    (out / LEGACY_STATE).unlink(missing_ok=True)


def load_state(out: Path) -> dict:
    """The saved state as {"step", "model" (name -> tensor), "optimizer" (a state_dict), "rng_torch",
    "python_rng", and the saved info}; a tampered or foreign file is a one-line refusal."""
    if not (out / STATE_JSON).is_file():
        return _load_legacy(out / LEGACY_STATE)
    path = out / STATE_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        tensor_file = out / record["tensors"]
        if Path(record["tensors"]).name != record["tensors"] or record.get("format") != FORMAT:
            raise ValueError("unexpected tensor file or format")
        tensors = load_file(str(tensor_file))
        optimizer = {"param_groups": record["optimizer"]["param_groups"], "state": {}}
        for index, plain in record["optimizer"]["state"].items():
            optimizer["state"][int(index)] = dict(plain)
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                optimizer["state"].setdefault(int(index), {})[name] = value
        version, internal, gauss = record["python_rng"]
        state = {k: v for k, v in record.items() if k not in ("optimizer", "python_rng", "tensors", "format")}
        return {**state, "model": {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
                "optimizer": optimizer, "rng_torch": tensors["rng/torch"],
                "python_rng": (version, tuple(internal), gauss)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise PaliGemmaError(f"'{path}' is not a trainer state this tool can resume from ({type(e).__name__}: "
                             f"{str(e)[:100]}); start a new run") from None


def _load_legacy(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {**state, "rng_torch": state["rng"]["torch"], "python_rng": state["rng"]["python"]}
    except Exception as e:  # weights_only refuses pickled code with an UnpicklingError, among others
        raise PaliGemmaError(f"refusing '{path}': it is not a plain-tensor trainer state ({type(e).__name__}); "
                             "only files this tool wrote can be resumed") from None
