"""Memory per rank of LoRA fine-tuning under FSDP2 against DDP, for a 3B-sized PaliGemma.

Two measurements, neither a test:

1. Accounting on the meta device (the default; seconds, no memory). For each world size the published
   config is built on `meta`, LoRA is applied as `paligemma train` does (r 8 on the decoder's linears) and
   FSDP2's `fully_shard` cuts it into the trainer's units (each decoder and vision layer, the rest the root)
   under a fake process group of that size, so the shard shapes (padding included) are FSDP2's own. Per
   rank, in float32 with AdamW: DDP holds the whole model, the trained weights' gradients, AdamW's two
   moments and DDP's gradient buckets; FSDP2 holds its shards of all four, and while it computes, the root
   unit whole (it holds the tied embedding, used at both ends of the forward) and two layer units whole
   (the one computing and the one prefetched). Activations are left out: the same in both at the same
   per-rank batch.

2. `--measure`: real two-rank gloo runs of `Trainer` on the CPU with a cut-down config that fits this
   machine (the published widths and 257k vocabulary, `--text-layers` / `--vision-layers` layers), LoRA,
   one example per rank, `--steps` steps, DDP then FSDP2. Each rank reports its peak RSS (VmHWM) over
   set-up (every rank builds the whole float32 model before FSDP2 shards it), then, the peak reset through
   /proc/self/clear_refs, over the training steps, and over the final save (adapter only). The random
   bf16 checkpoint is written once (`common.write_lora_checkpoint`).

    python bench/fsdp_memory.py --config paligemma2-3b-224 --world-sizes 1,2,4,8
    python bench/fsdp_memory.py --measure --text-layers 2 --vision-layers 2 --steps 2 --work /tmp/fsdp-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from common import CONFIGS, machine_info, machine_line, model_config, vm_hwm_gb, write_lora_checkpoint

GB = 1e9


def accounting(config: str, world_size: int, lora_r: int) -> dict:
    """Bytes per rank (rank 0, whose shards are the largest) of DDP and FSDP2 for `config` with LoRA."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from paligemma_cli.model.lora import apply_lora
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.model.skeleton import empty_skeleton

    with empty_skeleton():
        model = PaliGemma(model_config(config))
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, lora_r, 2 * lora_r)  # on meta, as the base weights are
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [*model.language_model.layers, *model.vision_tower.encoder.layers]
    layer_full = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    root_full = total - sum(p.numel() for layer in layers for p in layer.parameters())
    f32 = 4
    ddp = {"params": total * f32, "grads": trained * f32, "adamw": 2 * trained * f32, "buckets": trained * f32}
    result = {"world_size": world_size, "parameters": total, "trained": trained,
              "ddp_bytes": {**ddp, "total": sum(ddp.values())}}
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().numel() for p in model.parameters())
        trained_local = sum(p.to_local().numel() for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
    state = {"params": local * f32, "grads": trained_local * f32, "adamw": 2 * trained_local * f32}
    gathered = {"root_unit": root_full * f32, "two_layer_units": 2 * layer_full * f32}
    # The shards of what is gathered are already counted in the state: only the rest of it is extra.
    extra = sum(gathered.values()) * (world_size - 1) / world_size
    result["fsdp_bytes"] = {**state, "sharded_total": sum(state.values()), **gathered,
                            "total": sum(state.values()) + extra}
    return result


def print_accounting(rows: list[dict]) -> None:
    first = rows[0]
    print(f"{first['parameters'] / 1e9:.2f} B parameters, {first['trained'] / 1e6:.2f} M trained (LoRA); "
          "GB per rank, float32 + AdamW, activations left out")
    print(f"{'ranks':>5}  {'DDP':>7}  {'FSDP2 shards':>12}  {'+ gathered':>10}  {'FSDP2/DDP':>9}")
    for row in rows:
        ddp, fsdp = row["ddp_bytes"]["total"] / GB, row["fsdp_bytes"]
        print(f"{row['world_size']:>5}  {ddp:>7.2f}  {fsdp['sharded_total'] / GB:>12.2f}  {fsdp['total'] / GB:>10.2f}"
              f"  {fsdp['total'] / GB / ddp:>9.2f}")


# --- measured -----------------------------------------------------------------------------------------------


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def worker(args) -> None:
    """One rank of a measured run (launched by `measure` under torchrun)."""
    from paligemma_cli.distributed import launched
    from paligemma_cli.training.paligemma import TrainConfig, Trainer

    work = Path(args.work)
    cfg = TrainConfig(data=str(work / "data" / "data.jsonl"), out=str(work / f"run-{args.worker}"), model=args.model,
                      steps=args.steps, batch_size=2, lora_save="adapter", precision="fp32", save_every=10_000,
                      log_every=10_000)
    with launched("cpu") as world:
        trainer = Trainer(cfg, world=world, sharding=args.worker)
        setup = vm_hwm_gb()
        reset_peak()
        for _ in range(args.steps):
            trainer.train_step()
        steps = vm_hwm_gb()
        reset_peak()
        trainer.checkpoint()
        save = vm_hwm_gb()
        peaks = world.gather({"setup_gb": round(setup, 2), "steps_gb": round(steps, 2), "save_gb": round(save, 2)})
        if world.is_main:
            print("PEAKS " + json.dumps(peaks), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args) -> dict:
    name = f"paligemma2-3b-224-t{args.text_layers}-v{args.vision_layers}"
    CONFIGS[name] = ("paligemma2-3b-224", {
        "text__num_hidden_layers": args.text_layers, "vision__num_hidden_layers": args.vision_layers,
        "text__layer_types": ["sliding_attention", "full_attention"] * (args.text_layers // 2)
                             + ["sliding_attention"] * (args.text_layers % 2)})
    work = Path(args.work)
    ckpt = write_lora_checkpoint(name, work)
    # The same accounting for the measured config, to set beside the measured peaks.
    out = {"config": name, "steps": args.steps, "per_rank_batch": 1, "ranks": 2,
           "accounting": accounting(name, 2, args.lora_r)}
    print(f"{name}: accounting at 2 ranks, GB per rank: DDP {out['accounting']['ddp_bytes']['total'] / GB:.2f}, "
          f"FSDP2 shards {out['accounting']['fsdp_bytes']['sharded_total'] / GB:.2f}, with the gathered units "
          f"{out['accounting']['fsdp_bytes']['total'] / GB:.2f}", flush=True)
    for sharding in ("ddp", "fsdp"):
        shutil.rmtree(work / f"run-{sharding}", ignore_errors=True)
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), __file__, "--worker", sharding, "--model", str(ckpt),
                "--work", str(work), "--steps", str(args.steps), "--text-layers", str(args.text_layers),
                "--vision-layers", str(args.vision_layers)]
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAKS ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{sharding} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out[sharding] = json.loads(lines[0].removeprefix("PEAKS "))
        print(f"{sharding}: peak RSS per rank {out[sharding]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paligemma2-3b-224")
    ap.add_argument("--world-sizes", default="1,2,4,8")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--measure", action="store_true", help="run the two-rank CPU measurement too")
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default="/tmp/fsdp-bench")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    machine = machine_info()
    print(machine_line(machine), flush=True)
    rows = [accounting(args.config, int(w), args.lora_r) for w in args.world_sizes.split(",")]
    print_accounting(rows)
    result = {"config": args.config, "lora_r": args.lora_r, "accounting": rows, "machine": machine}
    if args.measure:
        result["measured"] = measure(args)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
