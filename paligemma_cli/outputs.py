"""Where the tool writes: never over one of its inputs, never over a folder it did not write itself.

Files a command produces (captions, predictions, pictures) are checked before any work starts: an
output that is one of the inputs is refused, as is one whose folder is missing or that names a folder.
Folders the tool writes as a whole (a converted checkpoint, a training run) carry a marker file, so that
`--force` replaces only such a folder, never one a person filled; and an output folder may neither be
nor hold nor sit inside an input. Every refusal and every failed write is one line that says why.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from paligemma_cli.errors import PaliGemmaError

MARKER = ".paligemma-output"  # in every folder the tool writes as a whole


def resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser().resolve()))


def is_within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def why(error: OSError) -> str:
    """A short reason for a failed file operation, the disk-full case named plainly."""
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if error.errno == errno.EROFS:
        return "read-only file system"
    return error.strerror or str(error)


def check_output_file(out: str | Path, inputs: Iterable[str | Path] = (), option: str = "--out") -> Path:
    """`out` as a path that can be written and is none of `inputs`; otherwise a one-line error."""
    path = Path(out).expanduser()
    target = resolved(path)
    for source in inputs:
        if str(source) != "-" and resolved(source) == target:
            raise PaliGemmaError(f"{option} '{out}' is one of the inputs; write the output to another file")
    if path.is_dir():
        raise PaliGemmaError(f"{option} '{out}' is a folder; give a file name")
    if not target.parent.is_dir():
        raise PaliGemmaError(f"{option} '{out}': folder '{path.parent}' does not exist")
    return path


def check_output_dir_apart(folder: str | Path, inputs: Iterable[str | Path], option: str) -> Path:
    """`folder`, a place new files go into, if it holds none of `inputs` (so no file written there can
    be one of them); otherwise a one-line error."""
    path = Path(folder).expanduser()
    target = resolved(path)
    for source in inputs:
        if str(source) != "-" and is_within(resolved(source), target):
            raise PaliGemmaError(f"{option} '{folder}' holds the input '{source}'; choose another folder")
    if path.exists() and not path.is_dir():
        raise PaliGemmaError(f"{option} '{folder}' is a file; give a folder")
    return path


def same_file_key(name: str | Path) -> str:
    """What identifies an input file across runs: its resolved path, however it was spelled."""
    return os.path.realpath(name)


def cut_torn_record(path: Path, complete: Callable[[bytes], int] = lambda data: data.rfind(b"\n") + 1) -> str:
    """The text of `path`'s whole records, after cutting off a last one that an interrupted run left
    unfinished (so records appended next start clean). `complete(data)` is the length of the whole
    records in `data`; by default, every record ends with a newline."""
    data = path.read_bytes()
    keep = complete(data)
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return data[:keep].decode("utf-8", errors="surrogateescape")


def open_output(path: str | Path, mode: str = "w", **kwargs):
    """`open(path, mode)` whose failure is a one-line error."""
    try:
        return open(path, mode, **kwargs)
    except OSError as e:
        raise PaliGemmaError(f"cannot write '{path}': {why(e)}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that it is either the old file or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def marked_kind(folder: Path) -> str | None:
    """What the tool wrote `folder` as ("checkpoint", "training run", ...), or None if it did not."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) and record.get("written_by") == "paligemma" else None


def is_marked(folder: Path) -> bool:
    return marked_kind(folder) is not None


def mark_folder(folder: Path, kind: str) -> None:
    """Record that the tool wrote `folder` (a checkpoint, a run), so a later `--force` may replace it."""
    (folder / MARKER).write_text(json.dumps({"written_by": "paligemma", "kind": kind}) + "\n")


def check_output_folder(dst: str | Path, inputs: Iterable[str | Path] = (), force: bool = False,
                        option: str = "output folder") -> Path:
    """A folder the tool may write whole: not an input, not inside or around one; an existing one only with
    `force`, and then only if it is empty or this tool wrote it (it holds the marker)."""
    path = Path(dst).expanduser()
    target = resolved(path)
    for source in inputs:
        src = resolved(source)
        if is_within(src, target):
            raise PaliGemmaError(f"{option} '{dst}' is or holds the input '{source}'; choose another folder")
        if is_within(target, src):
            raise PaliGemmaError(f"{option} '{dst}' lies inside the input '{source}'; choose another folder")
    if path.exists() and not path.is_dir():
        raise PaliGemmaError(f"{option} '{dst}' is a file; the output is a folder")
    if path.is_dir():
        if not force:
            raise PaliGemmaError(f"'{dst}' already exists; choose another folder or pass --force to replace it")
        if any(path.iterdir()) and not is_marked(path):
            raise PaliGemmaError(f"'{dst}' holds files this tool did not write; --force replaces only folders "
                                 "it wrote itself: choose another folder")
    return path
