"""Options shared by several commands, defined once (as the `hf` CLI does)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m",
    help="Checkpoint folder, or a hub id already downloaded. Default: $PALIGEMMA_MODEL, the config file, "
         "then the built-in demo model.",
    show_default=False,
)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16 where the hardware has it, else fp32), fp32, bf16, fp16.")]
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", help="none, or int8: the decoder's weights in int8 with one scale per output channel "
                       "(half the memory of bf16; faster decoding on CPU in bf16). A folder saved by "
                       "`convert --quantize int8` is int8 whatever this says.")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="Compile the decode step with torch.compile (one graph for every generated token). The "
                      "first answer waits for the compiler (tens of seconds, less once inductor's disk cache "
                      "holds the graphs); worth it for long runs such as captioning a folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts instead of text.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy; higher samples more freely.")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=1, help="Sample only from the k most likely tokens.")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Sample from the smallest set of tokens whose probability reaches p.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed: the same seed gives the same sample.")]
LangOpt = Annotated[str, typer.Option("--lang", help="Language code of the prompt, e.g. en, de, fr.")]
