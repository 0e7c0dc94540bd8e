"""The user's settings: which model a command loads when none is named.

When no `--model` is given, the choice falls back, in order, to the `PALIGEMMA_MODEL` environment
variable, to `model = "..."` in the config file (`$PALIGEMMA_CONFIG`, else
`~/.config/paligemma/config.toml`), and to the tiny demo model shipped inside the package. A named
model is a checkpoint folder or a Hub id already downloaded (`checkpoints.locate.find_checkpoint`).

`segment` also needs the VQ-VAE that decodes `<seg>` tokens (`resolve_vae`): `--vae PATH`, else a
`vae-oid.npz` beside the model, else `vae = "..."` in the config file, else the copy `paligemma download
--vae` put in the Hugging Face cache (from `vae_repo` / `vae_file` in the config file, or the defaults).

Only the standard library is imported here, so `paligemma --help` stays instant.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from paligemma_cli.checkpoints.locate import EXAMPLE_REPO, VAE_FILE, VAE_REPO, cached_vae, find_checkpoint
from paligemma_cli.errors import PaliGemmaError

ENV_MODEL = "PALIGEMMA_MODEL"
ENV_CONFIG = "PALIGEMMA_CONFIG"
DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "model"


def config_path() -> Path:
    """The config file to read: `$PALIGEMMA_CONFIG`, else `~/.config/paligemma/config.toml`."""
    explicit = os.environ.get(ENV_CONFIG)
    if explicit:
        return Path(explicit).expanduser()
    return Path("~/.config/paligemma/config.toml").expanduser()


def _read_config() -> dict:
    """The config file's settings; {} when there is no file (and none was named)."""
    path = config_path()
    if not path.is_file():
        if os.environ.get(ENV_CONFIG):
            # The user pointed at this file on purpose; silently ignoring it would hide a typo.
            raise PaliGemmaError(f"{ENV_CONFIG} points to {path}, which does not exist")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PaliGemmaError(f"cannot read config file {path}: {e}") from None


def _config_string(key: str, example: str) -> str | None:
    value = _read_config().get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PaliGemmaError(f"{config_path()}: `{key}` must be a non-empty string, e.g. {key} = \"{example}\"")
    return value.strip()


def _model_from_config() -> tuple[str, Path] | None:
    """`(model, config file)` if the config file names a model."""
    model = _config_string("model", EXAMPLE_REPO)
    return None if model is None else (model, config_path())


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

    return find_checkpoint(spec)


def vae_source() -> tuple[str, str]:
    """(repo, file) where `paligemma download --vae` fetches the VQ-VAE: `vae_repo` / `vae_file` in the
    config file, else big_vision's `vae-oid.npz` in Google's PaliGemma demo Space."""
    return _config_string("vae_repo", VAE_REPO) or VAE_REPO, _config_string("vae_file", VAE_FILE) or VAE_FILE


def resolve_vae(spec: str | None, model_folder: Path | None = None) -> Path:
    """The VQ-VAE checkpoint (`vae-oid.npz`) that decodes the `<seg>` tokens of the model in `model_folder`.

    Looked for, in order: `spec` (--vae), `vae-oid.npz` beside the model, `vae = "..."` in the config
    file, the file `paligemma download --vae` cached. Never downloads.

    Raises:
        PaliGemmaError: a named file does not exist, or none is found (the message says where to put one).
    """
    if spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PaliGemmaError(f"--vae '{spec}' does not exist")
        return path
    if model_folder is not None and (Path(model_folder) / VAE_FILE).is_file():
        return Path(model_folder) / VAE_FILE
    configured = _config_string("vae", "~/models/vae-oid.npz")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise PaliGemmaError(f"{config_path()}: vae = \"{configured}\" does not exist")
        return path
    cached = cached_vae(*vae_source())
    if cached is not None:
        return cached
    beside = f"put {VAE_FILE} beside the model in {model_folder}, " if model_folder is not None else ""
    raise PaliGemmaError(f"no VQ-VAE to decode masks with: {beside}pass --vae PATH, add vae = \"PATH\" to "
                         f"{config_path()}, or run `paligemma download --vae`")
