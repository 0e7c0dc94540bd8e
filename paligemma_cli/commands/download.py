"""`paligemma download`: fetch a checkpoint from the Hugging Face Hub.

Thin on purpose: the work and every error message live in `paligemma_cli.checkpoints.hub`, which is
imported only when the command runs so `paligemma --help` never loads huggingface_hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def download(
    repo_id: Annotated[
        str, typer.Argument(help="Hub model id, e.g. google/paligemma2-3b-mix-224.", show_default=False)
    ],
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Branch, tag or commit hash.", show_default="main")
    ] = None,
    token: Annotated[
        Optional[str],
        typer.Option("--token", help="Hugging Face access token for gated models.", show_default="$HF_TOKEN"),
    ] = None,
    local_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--local-dir", help="Put the files in this folder instead of the Hugging Face cache.", file_okay=False
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the Hub to connect or send the next piece of "
                                              "data before giving up.")
    ] = 60.0,
) -> None:
    """Download a PaliGemma checkpoint and print the folder it is in.

    Only the files paligemma reads are fetched (config, safetensors
    weights, tokenizer); Flax and other copies are skipped. Files go to
    the Hugging Face cache, shared with transformers; run the command
    again after an interruption and it fetches only what is missing.
    Progress goes to stderr, the path alone to stdout.

    Google's PaliGemma models are gated: accept the licence on the
    model's page on huggingface.co, then set HF_TOKEN or pass --token.

    Examples:

        paligemma download google/paligemma2-3b-mix-224

        paligemma download google/paligemma2-3b-pt-448 --token hf_xxx

        paligemma download google/paligemma-3b-mix-224 --local-dir ./pg
    """
    from paligemma_cli.checkpoints.hub import download as download_checkpoint

    typer.echo(f"downloading {repo_id}{f'@{revision}' if revision else ''} ...", err=True)
    folder = download_checkpoint(repo_id, revision=revision, token=token, local_dir=local_dir, timeout=timeout)
    typer.echo(str(folder))
