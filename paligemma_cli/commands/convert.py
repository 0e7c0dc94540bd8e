"""`paligemma convert`: big_vision .npz -> folder, folder -> another dtype or int8, LoRA adapter -> merged folder.

Thin on purpose: the work and every error message live in `paligemma_cli.checkpoints.convert`, imported only
when the command runs so that `paligemma --help` never loads torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def convert(
    src: Annotated[Path, typer.Argument(
        help="A big_vision .npz file, a checkpoint folder, a training run saved with --lora-save adapter, or a VQ-VAE vae-oid.npz.",
        show_default=False)],
    dst: Annotated[Path, typer.Argument(help="The folder to write (must not exist unless --force).",
                                        show_default=False)],
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="fp32, bf16 or fp16.", show_default="the source's")] = None,
    quantize: Annotated[str, typer.Option(
        "--quantize", help="none, or int8: store the decoder's weights in int8 with one scale per output "
                           "channel (about half the size of bf16). Such a folder loads in paligemma, not in "
                           "transformers.")] = "none",
    merge_lora: Annotated[bool, typer.Option(
        "--merge-lora", help="Fold SRC's LoRA adapter into its base model.")] = False,
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="Base model folder for --merge-lora.", show_default="adapter_config.json's base_model",
        file_okay=False)] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", help="SentencePiece model to ship with a converted .npz (saved as tokenizer.model).",
        show_default=False)] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(
        "--max-shard-size", help="Split the weights into files of at most this size, e.g. 5GB.",
        show_default="one file")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    final_logit_softcap: Annotated[Optional[float], typer.Option(
        "--final-logit-softcap", help="Gemma 2 .npz only; 0 turns it off. The Hugging Face configs say 30.",
        show_default="0, as big_vision")] = None,
    attn_logit_softcap: Annotated[Optional[float], typer.Option(
        "--attn-logit-softcap", help="Gemma 2 .npz only; 0 turns it off.", show_default="50")] = None,
    query_pre_attn_scalar: Annotated[Optional[int], typer.Option(
        "--query-pre-attn-scalar", min=1, help="Gemma 2 .npz only: queries are scaled by its -1/2 power.",
        show_default="head_dim; 144 for 28B")] = None,
    sliding_window: Annotated[Optional[int], typer.Option(
        "--sliding-window", min=0, help="Gemma 2 .npz only: window of the even layers; 0 turns it off. The "
                                        "Hugging Face configs say 4096.",
        show_default="0, as big_vision")] = None,
) -> None:
    """Convert a checkpoint into a model folder and print the folder's path.

    A big_vision .npz (Google's original JAX release) becomes a folder
    that paligemma and transformers both load; its config is read off the
    array shapes, and a Gemma 2 decoder runs as in big_vision (no sliding
    window, no final soft-cap) unless the flags say otherwise. A folder can be re-saved in another dtype or in shards.
    A training run saved with --lora-save adapter is merged into its base.
    --quantize int8 stores the decoder in int8; every command loads it.
    A VQ-VAE (vae-oid.npz) is rewritten as a file in --dtype fp32 or fp16.
    The folder appears only when complete: a failed run leaves nothing.
    Progress goes to stderr, the path alone to stdout.

    Examples:

        paligemma convert pt_224.npz ./paligemma-3b-pt-224 --tokenizer paligemma_tokenizer.model

        paligemma convert ./paligemma-3b-pt-224 ./pg-bf16 --dtype bf16

        paligemma convert ./paligemma-3b-pt-224 ./pg-sharded --max-shard-size 2GB

        paligemma convert ./paligemma-3b-pt-224 ./pg-int8 --dtype bf16 --quantize int8

        paligemma convert runs/mine ./mine-merged --merge-lora

        paligemma convert runs/vqvae/vae-oid.npz ./vae-oid.npz --dtype fp16
    """
    from paligemma_cli.checkpoints.convert import convert as run_conversion

    folder = run_conversion(
        src, dst, dtype=dtype, merge_lora=merge_lora, base=base, tokenizer=tokenizer,
        max_shard_size=max_shard_size, force=force, progress=lambda msg: typer.echo(msg, err=True), quantize=quantize,
        final_logit_softcap=final_logit_softcap, attn_logit_softcap=attn_logit_softcap,
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window,
    )
    typer.echo(str(folder))
