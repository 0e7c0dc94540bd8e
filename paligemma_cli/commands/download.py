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
        Optional[str], typer.Argument(help="Hub model id, e.g. google/paligemma2-3b-mix-224.", show_default=False)
    ] = None,
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
    vae: Annotated[
        bool, typer.Option("--vae", help="Also fetch the VQ-VAE that `segment` decodes masks with (alone without REPO_ID).")
    ] = False,
    vae_repo: Annotated[
        Optional[str],
        typer.Option("--vae-repo", help="Where the VQ-VAE is published: owner/name, or spaces/owner/name for a Space.",
                     show_default="vae_repo in the config file, else spaces/google/paligemma-hf"),
    ] = None,
    vae_file: Annotated[
        Optional[str],
        typer.Option("--vae-file", help="The VQ-VAE's file in that repository.",
                     show_default="vae_file in the config file, else vae-oid.npz"),
    ] = None,
) -> None:
    """Download a PaliGemma checkpoint and print the folder it is in.

    Only the files paligemma reads are fetched (config, safetensors
    weights, tokenizer); Flax and other copies are skipped. Files go to
    the Hugging Face cache, shared with transformers; run the command
    again after an interruption and it fetches only what is missing.
    Progress goes to stderr, the path alone to stdout.

    Google's PaliGemma models are gated: accept the licence on the
    model's page on huggingface.co, then set HF_TOKEN or pass --token.

    --vae also fetches big_vision's vae-oid.npz, the VQ-VAE that turns
    `segment` answers into masks, and prints its path; `segment` then
    finds it without --vae.

    Examples:

        paligemma download google/paligemma2-3b-mix-224

        paligemma download google/paligemma2-3b-mix-224 --vae

        paligemma download --vae

        paligemma download google/paligemma2-3b-pt-448 --token hf_xxx

        paligemma download google/paligemma-3b-mix-224 --local-dir ./pg
    """
    from paligemma_cli.errors import PaliGemmaError

    if repo_id is None and not vae:
        raise PaliGemmaError("give a model id, e.g. `paligemma download google/paligemma2-3b-mix-224`, "
                             "or --vae for the segmentation VQ-VAE")
    if (vae_repo or vae_file) and not vae:
        raise PaliGemmaError("--vae-repo and --vae-file go with --vae")
    from paligemma_cli.checkpoints.hub import download as download_checkpoint
    from paligemma_cli.checkpoints.hub import download_vae
    from paligemma_cli.settings import vae_source

    if repo_id is not None:
        typer.echo(f"downloading {repo_id}{f'@{revision}' if revision else ''} ...", err=True)
        folder = download_checkpoint(repo_id, revision=revision, token=token, local_dir=local_dir, timeout=timeout)
        typer.echo(str(folder))
    if vae:
        default_repo, default_file = vae_source()
        repo, filename = vae_repo or default_repo, vae_file or default_file
        typer.echo(f"downloading {repo}/{filename} ...", err=True)
        # --revision names the model's revision; the VQ-VAE comes from its own repository's default branch.
        typer.echo(str(download_vae(repo, filename, token=token, local_dir=local_dir, timeout=timeout)))
