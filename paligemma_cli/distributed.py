"""Running under `torchrun`: the launch, each rank's device, its share of the work, and the collectives
the commands need.

Outside torchrun (no RANK / WORLD_SIZE in the environment), and under torchrun with one process,
`launch()` returns a one-process `World` and nothing here touches `torch.distributed`: a plain run is
exactly what it was. Otherwise each process is one rank of a process group: NCCL on `cuda:{LOCAL_RANK}`
where CUDA is, gloo on the CPU elsewhere (or with `--device cpu`).

Failures. Work that every rank does alike (settings, files, loading the model) runs inside
`World.agree`, which gathers every rank's outcome: if one failed, all stop, rank 0 printing the error
(naming the rank when it was not its own) and the others exiting quietly, so a bad flag is one line, not
one per rank, and no rank waits for one that has given up. A rank that dies elsewhere (killed, out of
memory) ends the job through torchrun, which stops the other ranks. Collectives wait at most
`$PALIGEMMA_DIST_TIMEOUT` seconds (default one hour) before failing.

Recipes, the design and its figures: docs/distributed.md.

References: PyTorch's `torch.distributed` (`init_process_group`, env:// rendezvous as `torchrun` sets
it), `DistributedDataParallel`, and FSDP2 (`torch.distributed.fsdp.fully_shard`, DTensor parameters),
as torchtitan uses them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from paligemma_cli.device import pick_device
from paligemma_cli.errors import PaliGemmaError, ReportedElsewhere

T = TypeVar("T")

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SHARDINGS = ("ddp", "fsdp")
TIMEOUT_ENV = "PALIGEMMA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600


@dataclass
class World:
    """This process's place in the job: rank `rank` of `size`, computing on `device`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes the files every rank contributes to."""
        return self.rank == 0

    # --- shares of the work ------------------------------------------------------------------------

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of `items`; shares differ in length by at most one, the first
        ranks taking the longer ones."""
        start, end = shard_bounds(len(items), self.rank, self.size)
        return items[start:end]

    # --- collectives (each a no-op on one process) ------------------------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over the ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        found = [None] * self.size
        dist.all_gather_object(found, obj)
        return found

    def agree(self, fn: Callable[[], T], *, main_only: bool = False) -> T:
        """Run `fn` on every rank and return its result there; with `main_only`, run it on rank 0 alone and
        return rank 0's result (picklable) on every rank.

        `fn` must not itself use collectives. If it failed on any rank, every rank raises: rank 0 its own
        error, or one naming the rank that failed; the others a `ReportedElsewhere` (exit 1, no message).
        """
        if not self.distributed:
            return fn()
        result, error = None, None
        try:
            if self.is_main or not main_only:
                result = fn()
        except Exception as e:  # KeyboardInterrupt goes on: torchrun stops every rank alike
            error = e
        shared = result if main_only and self.is_main else None
        outcomes = self.gather((None if error is None else describe(error), shared))
        settle([message for message, _ in outcomes], self.rank, error)
        return outcomes[0][1] if main_only else result

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous share of `n` items split `size` ways."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def settle(messages: Sequence[str | None], rank: int, error: BaseException | None) -> None:
    """Raise on rank `rank` if any rank failed (`messages[r]` is rank r's error line, None where it
    succeeded; `error` is this rank's own): rank 0 raises its own error, or one naming the first rank that
    failed; the others raise `ReportedElsewhere`, so that the job prints the error once."""
    failed = [(r, message) for r, message in enumerate(messages) if message is not None]
    if not failed:
        return
    if rank != 0:
        raise ReportedElsewhere(failed[0][1]) from error
    if error is not None:
        raise error
    first, message = failed[0]
    others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise PaliGemmaError(f"rank {first}{others}: {message}")


def describe(error: BaseException) -> str:
    """The one line an error becomes (as the CLI prints it)."""
    if isinstance(error, PaliGemmaError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"unexpected {type(error).__name__}{': ' + text[0] if text else ''}"


# --- the launch -----------------------------------------------------------------------------------------


def launch_env() -> dict[str, str] | None:
    """torchrun's variables, None outside a launch, or a one-line error for a partial or malformed one."""
    present = [k for k in LAUNCH_ENV if os.environ.get(k)]
    if not present:
        return None
    missing = [k for k in LAUNCH_ENV if k not in present]
    if missing:
        raise PaliGemmaError(f"incomplete torch.distributed launch: {', '.join(present)} set but not "
                             f"{', '.join(missing)}; start the job with `torchrun --nproc-per-node N -m "
                             "paligemma_cli …` (or unset them for one process)")
    env = {k: os.environ[k] for k in LAUNCH_ENV}
    try:
        rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise PaliGemmaError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers, got {env['RANK']!r}, "
                             f"{env['WORLD_SIZE']!r}, {env['LOCAL_RANK']!r}") from None
    if size < 1 or not 0 <= rank < size or not 0 <= local <= rank:
        raise PaliGemmaError(f"inconsistent launch: RANK {rank}, LOCAL_RANK {local}, WORLD_SIZE {size}")
    return env


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise PaliGemmaError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def launch(device: str = "auto") -> World:
    """This process's `World`: one process outside torchrun, else its rank, joined to the process group.

    `device` is the commands' `--device`: auto (CUDA where there is one, else the CPU), cpu, or cuda.
    Under torchrun a rank computes on `cuda:{LOCAL_RANK}` with NCCL, or on the CPU with gloo.
    """
    env = launch_env()
    if env is None or int(env["WORLD_SIZE"]) == 1:
        return World(device=pick_device(device))
    rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    name = (device or "auto").lower()
    if name.startswith("cuda:"):
        raise PaliGemmaError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise PaliGemmaError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): "
                                 "launch at most that many processes per node (--nproc-per-node)")
        chosen, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(chosen)
    elif name in ("auto", "cpu"):
        chosen, backend = torch.device("cpu"), "gloo"
    else:
        chosen = pick_device(name)  # a clear error for cuda without CUDA or an unknown name
        raise PaliGemmaError(f"--device {chosen.type} does not run under torchrun; use cuda or cpu")
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout(),
                                device_id=chosen if chosen.type == "cuda" else None)
    except (RuntimeError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PaliGemmaError(f"cannot join the torch.distributed job at {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
                             f"as rank {rank} of {size}: {first}") from None
    return World(rank, size, local, chosen)


def torchrun_world(device: str = "auto") -> World | None:
    """The joined `World` of a torchrun job of several processes, or None (nothing touched) otherwise:
    for commands that keep their one-process path exactly as it is."""
    env = launch_env()
    if env is None or int(env["WORLD_SIZE"]) == 1:
        return None
    return launch(device)


@contextlib.contextmanager
def launched(device: str = "auto"):
    """`launch()` as a context that leaves the process group on the way out."""
    world = launch(device)
    try:
        yield world
    finally:
        world.close()


# --- data-parallel and sharded training ---------------------------------------------------------------


def wrap_for_training(module: nn.Module, world: World, sharding: str, blocks: Iterable[nn.Module] = ()) -> nn.Module:
    """`module` ready for data-parallel training on `world`: replicated under DDP, or, with "fsdp",
    each of `blocks` and then the rest of `module` sharded with FSDP2 (parameters, gradients and, once an
    optimizer is built over the new parameters, its state). Both average the gradients over the ranks.

    FSDP2 replaces the parameters with DTensors: build the optimizer after this, and move any saved state
    in with `shard_optimizer_state`.
    """
    if sharding not in SHARDINGS:
        raise PaliGemmaError(f"--sharding must be ddp or fsdp, got {sharding!r}")
    if sharding == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(world.device.type, (world.size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel

    # The buffers (rotary tables, position ids) are constants: broadcasting them every step buys nothing.
    return DistributedDataParallel(module, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """`tensors` whole and on the CPU, one tensor at a time; where `keep` is False (ranks that do not
    write) the gathered tensors are dropped as they come, so no rank but the writer holds them all."""
    out = {}
    for name, t in tensors.items():
        whole = full_tensor(t.detach())
        if keep:
            out[name] = whole.cpu()
    return out


def gathered_optimizer_state(state: dict, keep: bool) -> dict:
    """An optimizer `state_dict()` whose per-parameter tensors are whole (see `gathered`), in the form a
    one-process optimizer has, so that a run saved by N ranks resumes on any number."""
    groups = state["param_groups"]
    out: dict = {"param_groups": groups, "state": {}}
    for index in sorted(state["state"]):
        entries = {}
        for key, value in state["state"][index].items():
            whole = full_tensor(value) if isinstance(value, torch.Tensor) else value
            entries[key] = whole.cpu() if isinstance(whole, torch.Tensor) else whole
        if keep:
            out["state"][index] = entries
    return out


def shard_optimizer_state(state: dict, params: Sequence[torch.Tensor]) -> dict:
    """A whole (one-process) optimizer `state_dict()` cut to this rank's shards of `params`, the flat list
    of the optimizer's parameters in its index order. Every rank holds the whole state, so each takes its
    own share without communication."""
    from torch.distributed.tensor import distribute_tensor

    out = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        param = params[int(index)]
        out["state"][index] = {
            key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if is_sharded(param) and isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for key, value in entries.items()
        }
    return out


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for FSDP2's DTensor gradients: the norm over every rank's shards
    (the same number on every rank), and every shard scaled by it."""
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if is_sharded(total):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Inside with `enabled` False, DDP accumulates gradients locally and leaves the all-reduce to a
    later backward (the last micro-batch of a step). FSDP2 reduces at every backward, which keeps its
    gradients sharded between micro-batches."""
    if enabled or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield
