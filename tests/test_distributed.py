"""Training, captioning and evaluating under torchrun (gloo on 127.0.0.1, 2 processes), against one process.

- After 3 steps, 2 ranks give the weights of one process on the same global batch (float32, within 1e-5)
  for full fine-tuning and LoRA, under DDP and FSDP2, with an unreadable image in the data, uneven shares
  (a batch of 3) and gradient accumulation; a run saved by 2 ranks resumes in 1 process and one saved by 1
  resumes on 2, each ending where the uninterrupted run does.
- `caption` on 2 ranks writes the very file one process writes; with a rank killed part-way, `--resume`
  completes it without a duplicate or a gap. `eval` on 2 ranks prints the one-process scores and writes
  the same predictions.
- A bad launch or a bad flag is one `error:` line for the whole job, not one per rank.

Each torchrun launch costs seconds (two Python processes importing torch), so the training runs share one
launch (`fixtures/distributed_training.py`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.commands.caption import Format, merge_parts, part_path
from paligemma_cli.data.shapes import write_dataset
from paligemma_cli.distributed import World, launch_env, settle, shard_bounds
from paligemma_cli.errors import PaliGemmaError, ReportedElsewhere
from paligemma_cli.training.paligemma import TrainConfig, Trainer
from paligemma_cli.training.resume_state import load_state

runner = CliRunner()
WORKER = Path(__file__).parent / "fixtures" / "distributed_training.py"
LAUNCH_TIMEOUT_S = 300
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")


# --- launching --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *map(str, args)]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "PALIGEMMA_MODEL", "PALIGEMMA_CONFIG")}
    # A rank that waits for one that has gone fails in a minute instead of an hour.
    return {**env, "OMP_NUM_THREADS": "1", "PALIGEMMA_DIST_TIMEOUT": "60"}


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_argv(*args), cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- the pieces, without a launch ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 6, 7])
def test_shares_cover_every_item_once_and_differ_by_at_most_one(n):
    bounds = [shard_bounds(n, rank, 3) for rank in range(3)]
    assert [i for start, end in bounds for i in range(start, end)] == list(range(n))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_world_runs_everything_itself():
    world = World()
    assert not world.distributed and world.is_main and world.shard([1, 2, 3]) == [1, 2, 3]
    assert world.agree(lambda: 7) == 7 and world.all_sum([1, 2]) == [1.0, 2.0] and world.gather("x") == ["x"]
    with pytest.raises(PaliGemmaError, match="boom"):
        world.agree(lambda: (_ for _ in ()).throw(PaliGemmaError("boom")))


def test_a_failure_on_any_rank_stops_every_rank_and_rank_0_alone_reports_it():
    settle([None, None], 0, None)  # nobody failed
    with pytest.raises(PaliGemmaError, match=r"^rank 1: no such file$") as caught:
        settle([None, "no such file"], 0, None)
    assert not isinstance(caught.value, ReportedElsewhere)
    with pytest.raises(ReportedElsewhere):
        settle([None, "no such file"], 1, PaliGemmaError("no such file"))
    own = PaliGemmaError("bad flag")
    with pytest.raises(PaliGemmaError) as caught:
        settle(["bad flag", "bad flag", None], 0, own)
    assert caught.value is own  # a failure every rank shares is printed as rank 0's own
    with pytest.raises(PaliGemmaError, match=r"^rank 1 \(and 1 other rank\(s\)\): x$"):
        settle([None, "x", "y"], 0, None)



def test_the_cli_exits_quietly_on_an_error_rank_0_reports(capsys, monkeypatch):
    import typer

    from paligemma_cli.cli import DEBUG_ENV, friendly_errors

    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def fails():
        raise ReportedElsewhere("rank 1: no such file")

    with pytest.raises(typer.Exit) as stopped:
        friendly_errors(fails)()
    assert stopped.value.exit_code == 1 and capsys.readouterr().err == ""


def test_a_partial_launch_is_one_line(monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert launch_env() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PaliGemmaError, match="incomplete torch.distributed launch.*not LOCAL_RANK, MASTER_ADDR"):
        launch_env()
    (tmp_path / "a.png").write_bytes(b"")
    for command in (["caption", tmp_path / "a.png", "--out", tmp_path / "c.jsonl"],
                    ["eval", tmp_path / "d.jsonl"],
                    ["train", tmp_path / "d.jsonl", "--model-config", "tiny-32", "--out", tmp_path / "r"]):
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exit_code == 1 and result.stdout == ""
        assert error_lines(result.stderr) == [result.stderr.strip()], result.stderr
        assert "incomplete torch.distributed launch" in result.stderr
    for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(PaliGemmaError, match="whole numbers"):
        launch_env()


def test_merging_parts_keeps_input_order_and_drops_repeats_and_torn_records(tmp_path):
    images = [str(tmp_path / f"{i}.png") for i in range(6)]
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps({"image": images[0], "caption": "zero"}) + "\n")
    record = lambda i: json.dumps({"image": images[i], "caption": f"c{i}"}) + "\n"
    part_path(out, 0).write_text(record(4) + record(0) + record(2))  # 0 is already in out
    part_path(out, 1).write_text(record(3) + record(1) + '{"image": "torn')  # killed while writing
    assert merge_parts(out, Format.jsonl, images) == 4
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == images[:5]
    assert json.loads(out.read_text().splitlines()[0])["caption"] == "zero"  # what out held stays
    assert not part_path(out, 0).exists() and not part_path(out, 1).exists()
    assert merge_parts(out, Format.jsonl, images) == 0  # nothing left to merge


# --- training ---------------------------------------------------------------------------------------------


def settings(data: Path, out: Path, **kw) -> dict:
    base = dict(data=str(data), out=str(out), model_config="tiny-32", steps=3, batch_size=4, lr=1e-3,
                warmup_steps=1, schedule="constant", tokenizer_vocab_size=320, precision="fp32", log_every=1,
                save_every=100)
    return {**base, **kw}


def one_process(resume: bool = False, **kw) -> dict:
    return Trainer(TrainConfig(**kw), resume=resume).run()


# name -> (sharding, overrides): each compared with one process on the same settings.
DISTRIBUTED = {
    "ddp-all": ("ddp", dict(trainable="all")),
    "ddp-lora": ("ddp", dict(trainable="lora")),
    "fsdp-all": ("fsdp", dict(trainable="all")),
    "fsdp-lora": ("fsdp", dict(trainable="lora")),
    # A global batch of 3 gives the ranks 2 and 1 examples; two micro-batches per step.
    "ddp-uneven-accum": ("ddp", dict(trainable="all", batch_size=3, grad_accum=2)),
    "fsdp-uneven-accum": ("fsdp", dict(trainable="lora", batch_size=3, grad_accum=2)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every distributed run of this module from one torchrun launch, beside its one-process twin."""
    root = tmp_path_factory.mktemp("dist-train")
    data = write_dataset(root / "data", 12, seed=0, image_size=32)
    (root / "data" / "junk.png").write_bytes(b"\x89PNG cut short")
    lines = data.read_text().splitlines()
    lines.append(json.dumps({**json.loads(lines[0]), "image": "junk.png"}))  # unreadable: skipped where drawn
    data.write_text("\n".join(lines) + "\n")
    base = root / "base"
    one_process(**settings(data, base, steps=2))
    tuned = dict(model=str(base), model_config=None)

    specs = []
    for name, (sharding, overrides) in DISTRIBUTED.items():
        one_process(**settings(data, root / f"one-{name}", **tuned, **overrides))
        specs.append({"settings": settings(data, root / name, **tuned, **overrides), "sharding": sharding})
    # Saved by 2 ranks at step 2, resumed by one process below; saved by one at step 2, resumed by 2 ranks.
    specs.append({"settings": settings(data, root / "two-then-one", **tuned, trainable="all", steps=2),
                  "sharding": "fsdp"})
    one_process(**settings(data, root / "one-then-two", **tuned, trainable="lora", steps=2))
    specs.append({"settings": settings(data, root / "one-then-two", **tuned, trainable="lora"),
                  "sharding": "fsdp", "resume": True})
    (root / "runs.json").write_text(json.dumps(specs))
    t0 = time.perf_counter()
    proc = torchrun(WORKER, root / "runs.json", cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"{len(specs)} distributed runs in {time.perf_counter() - t0:.0f} s")
    one_process(**settings(data, root / "two-then-one", **tuned, trainable="all"), resume=True)
    return root


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize("name", DISTRIBUTED)
def test_two_ranks_train_the_weights_of_one_process(runs, name):
    assert max_difference(runs / name, runs / f"one-{name}") <= 1e-5
    two = json.loads((runs / name / "summary.json").read_text())
    one = load_state(runs / f"one-{name}")
    assert two["steps"] == 3 and two["skipped_images"] == one["skipped_images"]
    assert load_state(runs / name)["bad_images"] == one["bad_images"]
    # rank 0 alone logs: one line per step
    steps = [json.loads(line)["step"] for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_lora_run_trains_only_the_adapters_under_fsdp(runs):
    trained = load_state(runs / "fsdp-lora")["model"]
    assert trained and all("lora_A" in k or "lora_B" in k for k in trained)
    assert max_difference(runs / "fsdp-lora", runs / "base") > 0  # the merged adapters moved the weights


@pytest.mark.parametrize("name, twin", [("two-then-one", "one-ddp-all"), ("one-then-two", "one-ddp-lora")])
def test_a_run_resumes_on_another_number_of_processes(runs, name, twin):
    assert load_state(runs / name)["step"] == 3
    assert max_difference(runs / name, runs / twin) <= 1e-5


def test_a_bad_flag_is_one_error_line_for_the_job(runs, tmp_path):
    proc = torchrun("-m", "paligemma_cli", "train", runs / "data" / "data.jsonl", "--model-config", "tiny-32",
                    "--batch-size", "1", "--out", tmp_path / "r", cwd=tmp_path)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: --batch-size 1 is smaller than the 2 processes: each needs at "
                                        "least one example of every batch"], proc.stderr[-3000:]
    assert not (tmp_path / "r").exists()


# --- caption and eval -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """40 examples of every task, segment lines (scored with the demo model's VQ-VAE) among them."""
    folder = tmp_path_factory.mktemp("scenes") / "data"
    result = runner.invoke(app, ["demo-data", str(folder), "--n", "40", "--seed", "2", "--task", "all"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def expected(scenes, tmp_path_factory) -> bytes:
    """The captions file of one process."""
    out = tmp_path_factory.mktemp("one") / "captions.jsonl"
    result = runner.invoke(app, ["caption", str(scenes / "images"), "--out", str(out), "-b", "2"])
    assert result.exit_code == 0, result.output
    return out.read_bytes()


def test_caption_on_two_ranks_writes_the_one_process_file(scenes, expected, tmp_path):
    proc = torchrun("-m", "paligemma_cli", "caption", scenes / "images", "--out", tmp_path / "two.jsonl", "-b", "2",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == expected
    assert "captioned 40 image(s)" in proc.stderr and not list(tmp_path.glob(".two.jsonl.part-*"))


def rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (Linux /proc)."""
    found = {}
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(pid)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' processes in /proc")
def test_a_caption_job_with_a_killed_rank_resumes_without_repeats_or_gaps(scenes, expected, tmp_path):
    out = tmp_path / "two.jsonl"
    args = ("-m", "paligemma_cli", "caption", scenes / "images", "--out", out, "-b", "2")
    job = subprocess.Popen(torchrun_argv(*args), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    part = part_path(out, 1)
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while time.time() < deadline and job.poll() is None and len(part.read_bytes().splitlines() if part.exists() else []) < 2:
        time.sleep(0.01)
    pids = rank_pids(job.pid)
    assert job.poll() is None and 1 in pids, "the job ended before a rank could be killed"
    os.kill(pids[1], signal.SIGKILL)
    _, err = job.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert job.returncode != 0
    written = [json.loads(line)["image"] for line in out.read_text().splitlines()] if out.exists() else []
    assert len(written) < 40, "the job was killed after it had finished"

    proc = torchrun(*args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming:" in proc.stderr
    assert out.read_bytes() == expected
    assert not list(tmp_path.glob(".two.jsonl.part-*"))


def test_eval_on_two_ranks_gives_the_one_process_scores_and_predictions(scenes, tmp_path):
    data = scenes / "data.jsonl"
    one = runner.invoke(app, ["eval", str(data), "--limit", "24", "--json", "--predictions", str(tmp_path / "one.jsonl")])
    assert one.exit_code == 0, one.output
    proc = torchrun("-m", "paligemma_cli", "eval", data, "--limit", "24", "--json", "--predictions",
                    tmp_path / "two.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == json.loads(one.stdout)  # corpus scores (CIDEr-D, BLEU-4) included
    assert json.loads(one.stdout)["tasks"]["segment"]["n"] == 12  # masks decoded on the ranks' answers
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
