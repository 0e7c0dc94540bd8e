"""Finding a checkpoint folder by what the user calls it, without touching the network.

A model is named by a local folder holding `config.json`, or by a Hub id such as
`google/paligemma2-3b-mix-224` that `paligemma download` has already put in the Hugging Face cache:
running a model never downloads one behind the user's back. huggingface_hub is imported only when a
Hub id is looked up, so loading a local folder starts fast.
"""

from __future__ import annotations

from pathlib import Path

from paligemma_cli.errors import PaliGemmaError

# The files the tool reads from a checkpoint; `paligemma download` fetches exactly these.
CHECKPOINT_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
    "vae-oid.npz",  # the segmentation VQ-VAE, where a repository ships one beside the weights
]
EXAMPLE_REPO = "google/paligemma2-3b-mix-224"
# Where big_vision's mask VQ-VAE (`vae-oid.npz`) is published on the Hub: the Space of Google's PaliGemma
# demo keeps a copy of gs://big_vision/paligemma/vae-oid.npz. `spaces/` names a Space, as in a Hub URL.
VAE_REPO = "spaces/google/paligemma-hf"
VAE_FILE = "vae-oid.npz"


def find_checkpoint(spec: str) -> Path:
    """The checkpoint folder `spec` names, never downloading anything: a local folder holding
    `config.json`, or a Hub id such as `google/paligemma2-3b-mix-224` already in the local cache."""
    folder = Path(spec).expanduser()
    # A folder wins over a Hub id of the same spelling: `google/x` may well be a local copy.
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise PaliGemmaError(f"'{spec}' is not a PaliGemma checkpoint folder (no config.json)")
        return folder.resolve()
    if _looks_like_path(spec):
        raise PaliGemmaError(f"no such checkpoint folder '{spec}'")
    return _cached_snapshot(spec)


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a Hub id (`owner/name`), so a missing folder is the real problem."""
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") != 1


def _cached_snapshot(repo_id: str) -> Path:
    """The cached snapshot of `repo_id`, looked up with the network switched off."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=CHECKPOINT_PATTERNS))
    except IncompleteSnapshotError:
        raise PaliGemmaError(
            f"model '{repo_id}' is only partly downloaded; run `paligemma download {repo_id}` again to finish"
        ) from None
    except LocalEntryNotFoundError:
        raise PaliGemmaError(f"model '{repo_id}' is not downloaded; run `paligemma download {repo_id}` first") from None
    except HFValidationError:
        raise PaliGemmaError(
            f"'{repo_id}' is neither a checkpoint folder nor a Hub model id like {EXAMPLE_REPO}"
        ) from None
    if not (folder / "config.json").is_file():
        raise PaliGemmaError(f"model '{repo_id}' is not downloaded; run `paligemma download {repo_id}` first")
    return folder


def split_repo(spec: str) -> tuple[str, str]:
    """`spaces/owner/name` -> ("space", "owner/name"); `datasets/...` likewise; `owner/name` is a model."""
    for prefix, kind in (("spaces/", "space"), ("datasets/", "dataset"), ("models/", "model")):
        if spec.startswith(prefix):
            return kind, spec[len(prefix):]
    return "model", spec


def cached_vae(repo: str = VAE_REPO, filename: str = VAE_FILE) -> Path | None:
    """The VQ-VAE file `paligemma download --vae` put in the Hugging Face cache, found without the
    network; None if it is not there."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    kind, repo_id = split_repo(repo)
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE, repo_type=kind)
    except HFValidationError:
        return None
    return Path(found) if isinstance(found, str) else None
