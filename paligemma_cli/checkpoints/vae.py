"""`vae-oid.npz`, the VQ-VAE checkpoint big_vision publishes for PaliGemma's `<seg>` tokens: read and write.

References: big_vision `evaluators/proj/paligemma/transfers/segmentation.py` (`_get_params` reads the file
with `dict(np.load(f))`) and `pp/proj/paligemma/segmentation.py` (the encoder half); AiT
`vae/models/VQVAE.py` (the PyTorch module whose `state_dict` the file is).

The file is a flat `.npz` of float arrays keyed by PyTorch names, in PyTorch layouts (Conv2d
[O, I, kh, kw], ConvTranspose2d [I, O, kh, kw]), so it loads into `model.vqvae.VQVAE` unchanged. The code
width D is read from `_vq_vae._embedding` [128, D]. Decoding needs the 24 `decoder.*` arrays and the
codebook; the 22 `encoder.*` arrays are needed only to encode masks (training targets), and a file
without them still decodes. Other keys (the EMA buffers `_vq_vae._ema_*`) are ignored. Arrays are read
with `allow_pickle=False`: nothing in the file can run code.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.vqvae import NUM_CODES, VQVAE
from paligemma_cli.outputs import check_output_file

VAE_FILENAME = "vae-oid.npz"  # the published name; also what is looked for beside a model
CODEBOOK = "_vq_vae._embedding"


def expected_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array `VQVAE(dim)` reads from a checkpoint (codebook, encoder, decoder)."""
    with torch.device("meta"):
        model = VQVAE(dim)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("_vq_vae._ema")}


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise PaliGemmaError(f"VQ-VAE file '{path}' does not exist") from None
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError) as e:
        raise PaliGemmaError(f"'{path}' is not a readable .npz file ({str(e).splitlines()[0]})") from None


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQVAE, bool]:
    """The VQ-VAE in `path` (float32, eval mode) and whether it holds the encoder.

    Raises:
        PaliGemmaError: the file is missing, not an npz, or an array is missing or has the wrong shape
            (named with both shapes).
    """
    path = Path(path)
    arrays = _read_arrays(path)
    if CODEBOOK not in arrays:
        raise PaliGemmaError(f"'{path}' is not a PaliGemma VQ-VAE checkpoint: it has no '{CODEBOOK}' array")
    codebook = arrays[CODEBOOK]
    if codebook.ndim != 2 or codebook.shape[0] != NUM_CODES:
        raise PaliGemmaError(f"'{path}': '{CODEBOOK}' has shape {tuple(codebook.shape)}, expected ({NUM_CODES}, D)")
    expected = expected_shapes(int(codebook.shape[1]))
    has_encoder = any(k.startswith("encoder.") for k in arrays)
    wanted = {k: s for k, s in expected.items() if has_encoder or not k.startswith("encoder.")}
    missing = sorted(set(wanted) - set(arrays))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PaliGemmaError(f"'{path}' is not a complete VQ-VAE checkpoint: it lacks {', '.join(missing[:3])}{more}")
    for key, shape in wanted.items():
        got = tuple(arrays[key].shape)
        if got != shape:
            raise PaliGemmaError(f"'{path}': '{key}' has shape {got}, expected {shape}")
        if arrays[key].dtype.kind != "f":
            raise PaliGemmaError(f"'{path}': '{key}' holds {arrays[key].dtype}, expected floats")
    model = VQVAE(int(codebook.shape[1]))
    state = {k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in wanted}
    if not has_encoder:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("encoder.")})
    # The EMA buffers only matter while training; a loaded codebook starts them from itself.
    state["_vq_vae._ema_w"] = state[CODEBOOK].clone()
    state["_vq_vae._ema_cluster_size"] = torch.zeros(NUM_CODES)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), has_encoder


def vae_arrays(model: VQVAE, dtype=np.float32) -> dict[str, np.ndarray]:
    """The arrays of `vae-oid.npz` for `model` (codebook, encoder, decoder; no EMA buffers)."""
    return {k: v.detach().cpu().numpy().astype(dtype) for k, v in model.state_dict().items()
            if not k.startswith("_vq_vae._ema")}


def save_vae(model: VQVAE, path: str | Path, dtype=np.float32) -> Path:
    """Write `model` as a `vae-oid.npz`-style file, atomically (`dtype=np.float16` halves the size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **vae_arrays(model, dtype))
    tmp.replace(path)
    return path


def is_vae_file(path: str | Path) -> bool:
    """Whether `path` is an .npz holding a VQ-VAE codebook (rather than a big_vision PaliGemma)."""
    try:
        with zipfile.ZipFile(path) as z:
            return f"{CODEBOOK}.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def recast_vae(src: str | Path, dst: str | Path, dtype: str | None, force: bool = False) -> Path:
    """Rewrite the VQ-VAE file `src` as `dst` in `dtype` ("fp32", "fp16"; None keeps float32)."""
    dst = Path(dst).expanduser()
    if dst.exists() and not dst.is_dir():
        check_output_file(dst, [src], "the output")  # --force replaces a file, never the input itself
    if dst.exists() and not force:
        raise PaliGemmaError(f"'{dst}' already exists; choose another path or pass --force to replace it")
    if dst.is_dir():
        raise PaliGemmaError(f"'{dst}' is a folder; a VQ-VAE converts to a file (e.g. vae-oid.npz)")
    kinds = {None: np.float32, "fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16}
    if dtype not in kinds:
        raise PaliGemmaError(f"a VQ-VAE converts to fp32 or fp16, not {dtype!r} (numpy has no bf16)")
    model, has_encoder = load_vae(src)
    arrays = vae_arrays(model, kinds[dtype])
    if not has_encoder:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("encoder.")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(dst)
    return dst
