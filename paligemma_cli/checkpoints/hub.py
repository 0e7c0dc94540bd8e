"""Fetching a PaliGemma checkpoint from the Hugging Face Hub into the local cache.

Only the files the tool reads are fetched (see `CHECKPOINT_PATTERNS`): a repository may also hold
Flax, JAX or GGUF copies many gigabytes in size. Files land in the ordinary Hugging Face cache
(`$HF_HOME/hub`), so `transformers` and `hf` share them, and `find_checkpoint` finds them offline.

Resuming: `huggingface_hub` retries a file that breaks off mid-transfer with an HTTP Range request for
the missing bytes. Since huggingface_hub 1.x a partial file is not kept once the process ends, but every
file that finished is, so running `paligemma download` again fetches only what is still missing.

Every failure a user can fix becomes a one-line `PaliGemmaError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx2
from huggingface_hub import constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm

from paligemma_cli.checkpoints.locate import CHECKPOINT_PATTERNS, EXAMPLE_REPO, VAE_FILE, VAE_REPO, split_repo
from paligemma_cli.errors import PaliGemmaError


class _NoProgress(hf_tqdm):
    """Progress bars forced off, for `progress=False`, without touching huggingface_hub's global switch."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def download(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    local_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Download the checkpoint files of `repo_id` and return the folder that holds them.

    Args:
        repo_id: a Hub model id, e.g. `google/paligemma2-3b-mix-224`.
        revision: a branch, tag or commit hash; the default branch when None.
        token: a Hugging Face access token; else `HF_TOKEN`, else the token saved by `hf auth login`.
        local_dir: copy the files into this folder instead of the shared cache.
        progress: show progress bars on stderr.

    Returns:
        The snapshot folder in the cache (or `local_dir`), containing `config.json`.

    Raises:
        PaliGemmaError: the repository is gated, missing, has no such revision, holds no
            Transformers-format checkpoint, or the Hub cannot be reached.
    """
    token = token or os.environ.get("HF_TOKEN") or None
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it again honours a mirror set later.
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            local_dir=local_dir,
            allow_patterns=CHECKPOINT_PATTERNS,
            endpoint=endpoint,
            tqdm_class=None if progress else _NoProgress,
        )
    except HFValidationError:
        raise PaliGemmaError(
            f"'{repo_id}' is not a model repository id; expected owner/name, e.g. {EXAMPLE_REPO}"
        ) from None
    except RevisionNotFoundError:
        raise PaliGemmaError(f"model repository '{repo_id}' has no revision '{revision}'") from None
    except GatedRepoError:
        raise _gated(repo_id) from None
    except RepositoryNotFoundError:
        # The Hub answers 401 rather than 404 for a missing repo to anonymous users, so it may be private.
        hint = "" if token else " (if it is private, set HF_TOKEN or pass --token)"
        raise PaliGemmaError(f"no such model repository '{repo_id}'{hint}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise _gated(repo_id) from None
        raise PaliGemmaError(f"the Hugging Face Hub answered HTTP {status} for '{repo_id}'; try again later") from None
    except (LocalEntryNotFoundError, httpx2.TransportError) as e:
        # Offline, snapshot_download falls back to the cache and raises LocalEntryNotFoundError (caused by the
        # network error) when the repo is not there; a transfer that keeps breaking raises httpx2's error itself.
        cause = _network_cause(e)
        if cause is None:
            raise PaliGemmaError(f"downloading '{repo_id}' failed: {_one_line(e)}") from None
        raise PaliGemmaError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({_one_line(cause)}); {_cached_summary()}"
        ) from None
    except OSError as e:  # a full disk, a folder we may not write to, a size check that failed
        raise PaliGemmaError(f"downloading '{repo_id}' failed: {_one_line(e)}") from None

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PaliGemmaError(
            f"'{repo_id}' holds no config.json, so it is not a PaliGemma checkpoint in Transformers format"
        )
    return folder


def download_vae(repo: str = VAE_REPO, filename: str = VAE_FILE, revision: str | None = None,
                 token: str | None = None, local_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch the VQ-VAE checkpoint that decodes `<seg>` tokens (big_vision's `vae-oid.npz`) into the cache.

    Args:
        repo: where it is published, `spaces/owner/name` for a Space (as in a Hub URL), `datasets/...`
            for a dataset, else a model id. Default: the Space of Google's PaliGemma demo.
        filename: the file's path in that repository.
        revision, token, local_dir, progress: as for `download`.

    Returns:
        The local path of the file; `cached_vae` finds it again offline.
    """
    kind, repo_id = split_repo(repo)
    token = token or os.environ.get("HF_TOKEN") or None
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        path = hf_hub_download(repo_id, filename, repo_type=kind, revision=revision, token=token,
                               local_dir=local_dir, endpoint=endpoint, tqdm_class=None if progress else _NoProgress)
    except HFValidationError:
        raise PaliGemmaError(f"'{repo}' is not a repository id; expected owner/name or spaces/owner/name") from None
    except RevisionNotFoundError:
        raise PaliGemmaError(f"'{repo}' has no revision '{revision}'") from None
    except GatedRepoError:
        raise _gated(repo_id) from None
    except RepositoryNotFoundError:
        raise PaliGemmaError(f"no such {kind} repository '{repo_id}' (pass --vae-repo, e.g. spaces/owner/name)") from None
    except RemoteEntryNotFoundError:
        raise PaliGemmaError(f"'{repo}' holds no file '{filename}' (pass --vae-file)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        raise PaliGemmaError(f"the Hugging Face Hub answered HTTP {status} for '{repo}/{filename}'; try again later") from None
    except (LocalEntryNotFoundError, httpx2.TransportError) as e:
        cause = _network_cause(e)
        raise PaliGemmaError(f"cannot reach the Hugging Face Hub at {endpoint} ({_one_line(cause or e)})") from None
    except OSError as e:
        raise PaliGemmaError(f"downloading '{repo}/{filename}' failed: {_one_line(e)}") from None
    return Path(path)


def _gated(repo_id: str) -> PaliGemmaError:
    return PaliGemmaError(
        f"access to {repo_id} is gated: accept the licence at https://huggingface.co/{repo_id} "
        "and set HF_TOKEN or pass --token"
    )


def _network_cause(error: BaseException) -> BaseException | None:
    """The connection or timeout error behind `error`, if any, following `raise ... from`."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def cached_paligemma_repos() -> list[str]:
    """Ids of the PaliGemma model repositories in the local Hugging Face cache, sorted."""
    try:
        # Pass the folder explicitly: scan_cache_dir's default was frozen when huggingface_hub was imported.
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model" and "paligemma" in r.repo_id.lower())


def _cached_summary() -> str:
    repos = cached_paligemma_repos()
    return "already cached: " + ", ".join(repos) if repos else "nothing is cached"
