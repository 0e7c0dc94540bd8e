"""`paligemma env`: this machine's CPU class and which kernel computes each kind of layer on it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from paligemma_cli.options import DeviceOpt, DtypeOpt, JsonOpt


def env(
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    fast_layout: Annotated[bool, typer.Option(
        "--fast-layout/--no-fast-layout", help="As chat, caption of 4+ images and eval load (fast layout), or "
                                                "as ask and detect do.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Show the CPU, the dtype `--dtype auto` picks, and the kernel each layer type runs with, with and
    without --quantize int8. Reads no model.

    Examples:

      paligemma env

      paligemma env --dtype fp32 --json

      ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 paligemma env
    """
    import torch

    from paligemma_cli.device import pick_device, pick_dtype
    from paligemma_cli.machine import cpu_flags, cpu_model, physical_cores
    from paligemma_cli.speed.kernel_choice import cpu_facts, describe

    dev = pick_device(device)
    chosen = pick_dtype(dtype, dev)
    facts = cpu_facts()
    report = {
        "cpu": cpu_model(), "physical_cores": physical_cores(), "cpu_flags": cpu_flags(),
        "cpu_class": facts.cpu_class, "torch": torch.__version__, "torch_cpu_capability": facts.capability,
        "onednn_native_bf16": facts.native_bf16, "vnni": facts.vnni, "fbgemm": facts.fbgemm,
        "device": str(dev), "dtype": str(chosen).removeprefix("torch."), "fast_layout": fast_layout,
        "kernels": describe(chosen, dev, quantized=False, fast_layout=fast_layout),
        "kernels_int8": describe(chosen, dev, quantized=True, fast_layout=fast_layout),
    }
    if json_out:
        print(json.dumps(report))
        return
    print(f"cpu          {report['cpu']} ({report['physical_cores']} physical cores)")
    print(f"class        {facts.cpu_class}: torch kernels {facts.capability}; flags {' '.join(report['cpu_flags']) or '-'}")
    print(f"torch        {torch.__version__}; oneDNN bf16 {'native' if facts.native_bf16 else 'emulated'}; "
          f"int8 dot products {'VNNI' if facts.vnni else 'without VNNI'}; fbgemm {'yes' if facts.fbgemm else 'no'}")
    print(f"device       {dev}, dtype {report['dtype']}" + (" (--dtype auto)" if dtype == "auto" else ""))
    for title, kernels in (("kernels", report["kernels"]), ("--quantize int8", report["kernels_int8"])):
        print(title)
        for layer, kernel in kernels.items():
            print(f"  {layer:16s} {kernel}")
