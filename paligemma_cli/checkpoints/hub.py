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
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    scan_cache_dir,
    set_client_factory,
    snapshot_download,
)
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
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from paligemma_cli.checkpoints.locate import CHECKPOINT_PATTERNS, EXAMPLE_REPO, VAE_FILE, VAE_REPO, split_repo
from paligemma_cli.errors import PaliGemmaError


class _NoProgress(hf_tqdm):
    """Progress bars forced off, for `progress=False`, without touching huggingface_hub's global switch."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


DEFAULT_TIMEOUT_S = 60.0


class _DeadlineTransport(httpx2.HTTPTransport):
    """Gives every request a time limit for connecting and for each read. huggingface_hub sends some
    requests with `timeout=None`, and a server that accepts the connection but never answers would
    otherwise hang a download forever; a limit per read still lets a slow, steady download finish."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: self.seconds if given.get(k) is None else given[k]
                                         for k in ("connect", "read", "write", "pool")}
        return super().handle_request(request)


@contextmanager
def _requests_time_out(seconds: float):
    """huggingface_hub's shared HTTP client, with every request limited to `seconds` per step, for the
    duration of the block."""
    def client() -> httpx2.Client:
        return httpx2.Client(transport=_DeadlineTransport(seconds), follow_redirects=True,
                             event_hooks={"request": [hf_request_event_hook]})

    set_client_factory(client)
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


def download(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    local_dir: str | Path | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download the checkpoint files of `repo_id` and return the folder that holds them.

    Args:
        repo_id: a Hub model id, e.g. `google/paligemma2-3b-mix-224`.
        revision: a branch, tag or commit hash; the default branch when None.
        token: a Hugging Face access token; else `HF_TOKEN`, else the token saved by `hf auth login`.
        local_dir: copy the files into this folder instead of the shared cache.
        progress: show progress bars on stderr.
        timeout: seconds to wait for the Hub to connect and for each piece of data; a server that stops
            answering fails the download after this long instead of hanging.

    Returns:
        The snapshot folder in the cache (or `local_dir`), containing `config.json`.

    Raises:
        PaliGemmaError: the repository is gated, missing, has no such revision, holds no
            Transformers-format checkpoint, or the Hub cannot be reached.
    """
    token, endpoint = _token_and_endpoint(token, timeout)
    _check_local_dir(local_dir)
    try:
        with _requests_time_out(timeout):
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
        if isinstance(cause, (httpx2.TimeoutException, TimeoutError)):
            raise _timed_out(endpoint, timeout) from None
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
                 token: str | None = None, local_dir: str | Path | None = None, progress: bool = True,
                 timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Fetch the VQ-VAE checkpoint that decodes `<seg>` tokens (big_vision's `vae-oid.npz`) into the cache.

    Args:
        repo: where it is published, `spaces/owner/name` for a Space (as in a Hub URL), `datasets/...`
            for a dataset, else a model id. Default: the Space of Google's PaliGemma demo.
        filename: the file's path in that repository.
        revision, token, local_dir, progress, timeout: as for `download`.

    Returns:
        The local path of the file; `cached_vae` finds it again offline.
    """
    kind, repo_id = split_repo(repo)
    token, endpoint = _token_and_endpoint(token, timeout)
    _check_local_dir(local_dir)
    try:
        with _requests_time_out(timeout):
            _answers_within(hf_hub_url(repo_id, filename, repo_type=kind, revision=revision, endpoint=endpoint),
                            token, timeout, endpoint)
            path = hf_hub_download(repo_id, filename, repo_type=kind, revision=revision, token=token,
                                   local_dir=local_dir, endpoint=endpoint,
                                   tqdm_class=None if progress else _NoProgress)
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
        if isinstance(cause, (httpx2.TimeoutException, TimeoutError)):
            raise _timed_out(endpoint, timeout) from None
        raise PaliGemmaError(f"cannot reach the Hugging Face Hub at {endpoint} ({_one_line(cause or e)})") from None
    except OSError as e:
        raise PaliGemmaError(f"downloading '{repo}/{filename}' failed: {_one_line(e)}") from None
    return Path(path)


def _token_and_endpoint(token: str | None, timeout: float) -> tuple[str | None, str]:
    """The token to send (the given one, else `HF_TOKEN`) and the Hub's address, once `timeout` is checked."""
    if not timeout > 0:
        raise PaliGemmaError(f"--timeout must be a positive number of seconds, got {timeout}")
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it again honours a mirror set later.
    return token or os.environ.get("HF_TOKEN") or None, os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _check_local_dir(local_dir: str | Path | None) -> None:
    """A --local-dir must be new, empty, or one that downloads filled: never a folder of a person's files."""
    if local_dir is None:
        return
    target = Path(local_dir).expanduser()
    downloaded_before = (target / ".cache" / "huggingface").is_dir()  # huggingface_hub's own record
    if target.is_dir() and any(target.iterdir()) and not downloaded_before:
        raise PaliGemmaError(f"--local-dir '{local_dir}' holds files that were not downloaded here; "
                             "choose an empty or new folder")


def _answers_within(url: str, token: str | None, timeout: float, endpoint: str) -> None:
    """Raise the --timeout error if the Hub does not answer one request for `url` within `timeout`.
    hf_hub_download retries a request that timed out five more times, with a 60 s limit and back-off
    (minutes against a silent server); other failures are left to it to report (or to find the file
    in the cache when offline)."""
    try:
        get_hf_file_metadata(url, token=token, timeout=timeout)
    except (httpx2.TimeoutException, TimeoutError):
        raise _timed_out(endpoint, timeout) from None
    except Exception:
        pass


def _timed_out(endpoint: str, timeout: float) -> PaliGemmaError:
    return PaliGemmaError(f"the Hugging Face Hub at {endpoint} did not answer within {timeout:g} s; try again "
                          "later, or give it longer with --timeout SECONDS")


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
