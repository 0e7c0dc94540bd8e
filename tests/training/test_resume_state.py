"""The resume state: nothing read from a run folder runs code, and a checkpoint is whole or absent even
when the disk fills up part-way through writing it."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import paligemma_cli.training.resume_state as resume_state
from paligemma_cli.cli import app
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.training.resume_state import LEGACY_STATE, STATE_JSON, has_state, load_state
from tests.fixtures.bad_inputs import pickle_that_writes
from tests.training.test_paligemma import assert_same_weights, config, data, params, train  # noqa: F401


def test_a_pickled_trainer_state_is_refused_without_running_it(data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(config(data, out, steps=1))
    for f in out.glob("trainer_state*"):
        f.unlink()
    marker = tmp_path / "pwned"
    pickle_that_writes(out / LEGACY_STATE, marker)
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 1 and "refusing" in result.stderr and "Traceback" not in result.output
    assert not marker.exists()


def test_a_state_written_before_this_format_still_resumes(data, tmp_path):  # noqa: F811
    """Older runs saved `trainer_state.pt` with torch.save; its plain tensors load with weights_only."""
    whole, _, _ = train(config(data, tmp_path / "whole", steps=3))
    out = tmp_path / "old"
    train(config(data, out, steps=3), stop_at=2)
    state = load_state(out)
    legacy = {"step": state["step"], "skipped_images": state["skipped_images"], "bad_images": state["bad_images"],
              "model": state["model"], "optimizer": state["optimizer"], "config": state["config"],
              "rng": {"torch": state["rng_torch"], "python": state["python_rng"]}}
    for f in out.glob("trainer_state*"):
        f.unlink()
    torch.save(legacy, out / LEGACY_STATE)
    resumed, summary, _ = train(config(data, out, steps=3), resume=True)
    assert summary["steps"] == 3
    assert_same_weights(params(resumed.model), params(whole.model))


@pytest.mark.parametrize("damage", ["not json", "wrong tensor file", "missing tensor file"])
def test_a_damaged_state_is_a_one_line_refusal(data, tmp_path, damage):  # noqa: F811
    out = tmp_path / "run"
    train(config(data, out, steps=1))
    record = json.loads((out / STATE_JSON).read_text())
    if damage == "not json":
        (out / STATE_JSON).write_text("{ truncated")
    elif damage == "wrong tensor file":
        record["tensors"] = "../../elsewhere.safetensors"
        (out / STATE_JSON).write_text(json.dumps(record))
    else:
        (out / record["tensors"]).unlink()
    with pytest.raises(PaliGemmaError, match="not a trainer state"):
        load_state(out)


def fail_on_write(monkeypatch, target: str, on_call: int, partial: bool = True):
    """Make the `on_call`-th write through `resume_state.<target>` fail with a full disk, after writing
    part of its file when `partial`."""
    real = getattr(resume_state, target)
    calls = []

    def writer(*args):
        path = next(a for a in args if isinstance(a, Path))
        calls.append(path)
        if len(calls) == on_call:
            if partial:
                path.with_name(f".{path.name}.tmp").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(resume_state, target, writer)


@pytest.mark.parametrize("target", ["atomic_save_tensors", "atomic_write_text"])
def test_disk_full_at_a_later_checkpoint_keeps_the_one_before(data, tmp_path, monkeypatch, target):  # noqa: F811
    whole, _, _ = train(config(data, tmp_path / "whole", steps=4))
    cfg = config(data, tmp_path / "run", steps=4, save_every=1)
    fail_on_write(monkeypatch, target, on_call=2)  # step 1 saves, step 2 finds the disk full
    with pytest.raises(PaliGemmaError, match="no space left on the device; the run folder keeps step 1"):
        train(cfg)
    monkeypatch.undo()
    assert load_state(tmp_path / "run")["step"] == 1  # whole, and nothing of step 2's half-file is read
    resumed, summary, _ = train(cfg, resume=True)
    assert summary["steps"] == 4
    assert_same_weights(params(resumed.model), params(whole.model))


def test_disk_full_at_the_first_checkpoint_leaves_no_half_run(data, tmp_path, monkeypatch):  # noqa: F811
    cfg = config(data, tmp_path / "run", steps=2, save_every=1)
    fail_on_write(monkeypatch, "atomic_save_tensors", on_call=1)
    with pytest.raises(PaliGemmaError, match="keeps no checkpoint yet"):
        train(cfg)
    monkeypatch.undo()
    assert not (tmp_path / "run").exists() or not has_state(tmp_path / "run")
    # Neither stuck ("already holds a model") nor resumable from nothing: a new run starts.
    _, summary, _ = train(cfg)
    assert summary["steps"] == 2
