"""Writing files and folders so that each appears whole under its name, or not at all.

A file is written beside its target under a hidden name and renamed over it (`os.replace` is atomic on
one file system); a folder is filled under a hidden sibling name and swapped in when complete. An
interrupted write (Ctrl-C, a full disk) leaves the previous version, never a torn one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})  # the metadata transformers expects
    os.replace(tmp, path)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `target` to fill; on success it replaces `target` whole, on any
    error it is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder should not be
    try:
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`, swapping out an existing `target` with no moment where neither is whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
