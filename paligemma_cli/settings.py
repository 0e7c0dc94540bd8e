"""Which checkpoint folder a command should load.

A model is named by a local folder holding `config.json`, or by a Hub id such as
`google/paligemma2-3b-mix-224` that `paligemma download` has already put in the Hugging Face cache.
Nothing here touches the network: running a model never downloads one behind the user's back.

When no model is named, the choice falls back, in order, to the `PALIGEMMA_MODEL` environment
variable, to `model = "..."` in the config file (`$PALIGEMMA_CONFIG`, else
`~/.config/paligemma/config.toml`), and to the tiny demo model shipped inside the package.

Only the standard library is imported at module level so `paligemma --help` stays instant.
"""

from __future__ import annotations

import os
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
]

ENV_MODEL = "PALIGEMMA_MODEL"
ENV_CONFIG = "PALIGEMMA_CONFIG"
DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "model"
EXAMPLE_REPO = "google/paligemma2-3b-mix-224"


def config_path() -> Path:
    """The config file to read: `$PALIGEMMA_CONFIG`, else `~/.config/paligemma/config.toml`."""
    explicit = os.environ.get(ENV_CONFIG)
    if explicit:
        return Path(explicit).expanduser()
    return Path("~/.config/paligemma/config.toml").expanduser()


def _model_from_config() -> tuple[str, Path] | None:
    """`(model, config file)` if the config file names a model."""
    path = config_path()
    if not path.is_file():
        if os.environ.get(ENV_CONFIG):
            # The user pointed at this file on purpose; silently ignoring it would hide a typo.
            raise PaliGemmaError(f"{ENV_CONFIG} points to {path}, which does not exist")
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PaliGemmaError(f"cannot read config file {path}: {e}") from None
    model = data.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model.strip():
        raise PaliGemmaError(f"{path}: `model` must be a non-empty string, e.g. model = \"{EXAMPLE_REPO}\"")
    return model.strip(), path


def _default_choice() -> tuple[str | None, str]:
    """`(model spec, where it came from)` when no model is named on the command line."""
    env = os.environ.get(ENV_MODEL, "").strip()
    if env:
        return env, f"env:{ENV_MODEL}"
    from_config = _model_from_config()
    if from_config is not None:
        return from_config[0], f"config:{from_config[1]}"
    if (DEMO_MODEL / "config.json").is_file():
        return str(DEMO_MODEL), "demo"
    return None, "none"


def default_model_source() -> str:
    """Where the default model comes from, for `--json` outputs.

    One of `env:PALIGEMMA_MODEL`, `config:<path of the config file>`, `demo` (the built-in demo
    model) or `none` (nothing configured).
    """
    return _default_choice()[1]


def resolve_model(spec: str | None) -> Path:
    """The checkpoint folder for `spec`, never downloading anything.

    Args:
        spec: a local checkpoint folder, a Hub id already in the local cache (see
            `paligemma download`), or None for the configured default (see the module docstring).

    Returns:
        A folder that contains `config.json`.

    Raises:
        PaliGemmaError: the folder is not a checkpoint, the Hub model is not downloaded (or only
            partly), or no model is configured at all.
    """
    if spec is None:
        spec, _ = _default_choice()
        if spec is None:
            raise PaliGemmaError(
                f"no model is configured: pass --model, set {ENV_MODEL}, or add "
                f"`model = \"{EXAMPLE_REPO}\"` to {config_path()} "
                f"(then run `paligemma download {EXAMPLE_REPO}`)"
            )

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
