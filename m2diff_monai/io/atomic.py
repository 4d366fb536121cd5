"""Atomic file and folder writes: a crash or a kill never leaves a half-written result that a later run would trust.

Files: every writer creates a temporary file in the destination folder (same filesystem) and renames it into place
with :func:`os.replace`, which is atomic on POSIX.

Folders (a report, an exported bundle, a preprocessed subject): :func:`staged_folder` yields an empty temporary
folder next to the destination; when the block succeeds :func:`publish_folder` swaps it in. POSIX cannot rename a
folder onto a non-empty one, so an earlier version is first moved aside and deleted only once the new one is in
place (if the swap fails it is moved back). The rules of :mod:`m2diff_monai.io.safety` hold here too: the
destination is checked against the run's inputs before anything moves, temporary folders carry their owner in
their name (``.tmp.<name>.<host>-p<pid>.*``, ``.old.<name>...``) so an abandoned one can be removed safely, and the
swap holds a short lock on the parent folder so two runs publishing the same folder leave one complete result,
never a mix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` defaults to the destination's full suffix (``.nii.gz``, ``.npy``...) because some writers
    choose the format from the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# ------------------------------------------------------------------------------------------------ folders
def _temp_label(name: str) -> str:
    """The folder name reduced to the characters an owner-labelled temp name may hold (see safety._OWNED)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def new_staging_folder(dest: str | Path) -> Path:
    """An empty, owner-labelled temporary folder next to ``dest`` (same file system, so the final rename is
    atomic), with the usual folder mode (``mkdtemp`` makes it private). Abandoned temps of ``dest`` whose owner
    process is gone are removed first."""
    from m2diff_monai.io import safety

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    label = _temp_label(dest.name)
    safety.remove_abandoned_temps(dest.parent, ("tmp", "old"), label)
    staging = Path(tempfile.mkdtemp(prefix=safety.owned_temp_prefix("tmp", label), dir=dest.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


def publish_folder(
    staging: str | Path, dest: str | Path, *, inputs: Any | None = None, option: str = "--out", lock: bool = True
) -> Path:
    """Make the finished folder ``staging`` become ``dest``, replacing an earlier ``dest`` as a whole.

    ``inputs`` (a :class:`~m2diff_monai.io.safety.RunInputs`): refuse with an InputError naming ``option`` when
    ``dest`` is or holds one of the run's inputs; nothing moves then. Whether ``dest`` is something this tool may
    replace at all (an earlier report, an earlier export) is the caller's rule, checked before the work starts.
    ``lock=False`` when the caller already holds the lock of the whole output root. A symlink at ``dest`` is
    replaced as a link (its target is never touched); a plain file at ``dest`` is refused.
    On failure ``dest`` is as before and ``staging`` is left for the caller to remove."""
    staging, dest = Path(staging), Path(dest)
    if inputs is not None:
        inputs.check(dest, option)
    if not dest.is_symlink() and dest.exists() and not dest.is_dir():
        from m2diff_monai.errors import InputError

        raise InputError(f"{option} exists and is not a folder; it is not replaced", path=dest)
    with _publish_lock(dest, lock):
        _swap(staging, dest)
    return dest


def _swap(staging: Path, dest: Path) -> None:
    from m2diff_monai.io import safety

    if not os.path.lexists(dest):
        os.replace(staging, dest)
        return
    aside = Path(tempfile.mkdtemp(prefix=safety.owned_temp_prefix("old", _temp_label(dest.name)), dir=dest.parent))
    old = aside / dest.name
    os.replace(dest, old)
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(old, dest)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _publish_lock(dest: Path, enabled: bool) -> Iterator[None]:
    """Serialize swaps into one folder: an exclusive ``flock`` on the destination's parent folder, held for the
    milliseconds of the swap. Locking the folder itself leaves no lock file behind; where the platform or the file
    system has no such lock the swap runs unlocked (it is still all-or-nothing for each run)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    fd = None
    if enabled and fcntl is not None:
        try:
            fd = os.open(dest.parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


@contextmanager
def staged_folder(
    dest: str | Path, *, inputs: Any | None = None, option: str = "--out", lock: bool = True
) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dest``; publish it as ``dest`` only if the block succeeds, else
    delete it (``dest`` is untouched). See :func:`publish_folder` for ``inputs``, ``option`` and ``lock``."""
    staging = new_staging_folder(dest)
    try:
        yield staging
        publish_folder(staging, dest, inputs=inputs, option=option, lock=lock)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_json(path: str | Path, obj: Any) -> Path:
    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")

    return write_with(path, _write)


def save_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return write_with(path, _write)


def save_nifti(path: str | Path, image: Any) -> Path:
    """Save a nibabel image atomically (the temporary name keeps the ``.nii.gz`` suffix nibabel needs)."""
    import nibabel as nib

    return write_with(path, lambda tmp: nib.save(image, str(tmp)))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
