"""The one output rule every tool obeys: never destroy an input, never write outside the output, never serve
stale results.

Before a tool deletes, replaces or writes a path it asks :class:`RunInputs` to prove that the path

- is not one of the run's input files and is not a folder holding one (compared after resolving symlinks, and
  by file identity — device and inode — so a hard link, a symlinked folder or a name that differs only in case
  on a case-insensitive file system is recognised as the same file), and
- when it was built from a name read from data (a subject id, a method name), stays inside its output root.

A violation is an :class:`~m2diff_monai.errors.InputError` naming the option and the input it would destroy,
raised before any work starts. Names read from data are checked with :func:`check_name` where they are read.

Also here, because every tool needs them the same way:

- :func:`fingerprint` / :func:`stale_roles`: a content fingerprint of an input file (SHA-256 of the whole file when
  it is small, else of its first and last MiB plus its size and modification time), so a resume notices an input
  rewritten in place with the same size;
- :func:`output_lock`: one lock file per output root (``filelock``): a second run on the same root refuses with a
  clear message instead of racing the first;
- :func:`owned_temp_prefix` / :func:`remove_abandoned_temps`: temporary folders carry their owner (host and
  process id) in their name, and stale-temp cleanup removes only those whose owner process is gone.

``--force`` never weakens any of this: it only means "redo / replace what this tool wrote before" (see
docs/safety.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from m2diff_monai.errors import InputError

SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")
SAFE_NAME_RULE = "letters, digits, '-' and '_'"
FULL_HASH_MAX_BYTES = 2 << 20  # files up to 2 MiB are hashed whole
# Larger files: the first and the last MiB, plus size and modification time. For ``.nii.gz`` the last 8 bytes are
# the gzip CRC-32 and length of the whole uncompressed image, so the tail covers every voxel; an uncompressed
# ``.nii`` changed only in its middle is caught by its modification time.
EDGE_BYTES = 1 << 20
LOCK_NAME = ".m2diff.lock"
MANIFEST_PATH_KEYS = (
    "ld_pet",
    "sd_pet",
    "mri",
    "brain_mask",
    "source_ld_pet",
    "source_sd_pet",
    "source_mri",
    "subject_json",
    "preprocessed_dir",
)

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------ paths
def resolved(path: PathLike) -> Path:
    """Absolute path with ``~`` expanded, ``..`` collapsed and every symlink followed (missing tails allowed)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _key(path: Path) -> str:
    """Comparison key of a resolved path: ``normcase`` folds case where the platform's file system does."""
    return os.path.normcase(str(path))


def is_within(path: PathLike, root: PathLike, follow_last: bool = True) -> bool:
    """True when ``path`` (resolved) is ``root`` (resolved) or lies below it. ``follow_last=False`` resolves only
    the folder of ``path``: where ``os.replace`` puts a file (it replaces a symlink, never its target)."""
    path = Path(path)
    p = resolved(path) if follow_last else resolved(path.parent) / path.name
    r = resolved(root)
    return _key(p) == _key(r) or _key(r) in {_key(a) for a in p.parents}


def check_name(value: object, what: str = "subject id", source: PathLike | None = None) -> str:
    """``value`` when it is a safe file-name component (letters, digits, '-', '_'), else an InputError.

    Called wherever a name is read from data (tables, manifests, folders), because such names become file names:
    ``../x``, ``/abs`` or ``a/b`` would put a file outside its folder."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise InputError(
            f"{what} {value!r} may contain only {SAFE_NAME_RULE} (it names files)",
            path=None if source is None else source,
        )
    return value


def child(root: PathLike, name: str, option: str, what: str = "name") -> Path:
    """``root / name`` for a single file name (no folder part, not ``.``/``..``), so a name from data cannot
    escape ``root``. The entry itself may be a symlink: readers may follow it, writers replace the link."""
    path = Path(root) / name
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise InputError(f"{what} {name!r} would put a file outside {option} {root}", path=path)
    return path


class RunInputs:
    """Every file a run reads, by label, for checking the paths it will write."""

    def __init__(self, files: Iterable[tuple[str, PathLike | None]] = ()):
        self._exact: dict[str, tuple[str, Path]] = {}  # key of a resolved input → (label, as given)
        self._exact_id: dict[tuple[int, int], tuple[str, Path]] = {}
        self._holders: dict[str, tuple[str, Path]] = {}  # key of a resolved folder above an input
        self._holder_id: dict[tuple[int, int], tuple[str, Path]] = {}
        for label, path in files:
            self.add(label, path)

    def add(self, label: str, path: PathLike | None) -> None:
        if path in (None, ""):
            return
        given = Path(path)
        r = resolved(given)
        self._exact.setdefault(_key(r), (label, given))
        ident = _identity(r)
        if ident is not None:
            self._exact_id.setdefault(ident, (label, given))
        for folder in r.parents:
            k = _key(folder)
            if k in self._holders:
                break  # this folder and everything above it are known already
            self._holders[k] = (label, given)
            ident = _identity(folder)
            if ident is not None:
                self._holder_id.setdefault(ident, (label, given))

    def add_manifest(self, manifest: PathLike, content: Mapping) -> None:
        """The manifest and every file its ``volumes`` list (paths relative to the manifest's folder); slice items
        live inside the listed ``preprocessed_dir`` folders, which count as inputs themselves."""
        manifest = Path(manifest)
        self.add("--manifest", manifest)
        base = manifest.resolve().parent
        for item in content.get("volumes") or []:
            if not isinstance(item, Mapping):
                continue
            sid = item.get("subject", "?")
            for key in MANIFEST_PATH_KEYS:
                value = item.get(key)
                if isinstance(value, str) and value:
                    self.add(f"{key} of subject {sid} (manifest)", base / value)
            regions = item.get("regions")
            if isinstance(regions, Mapping):
                for name, value in regions.items():
                    if isinstance(value, str) and value:
                        self.add(f"region {name} of subject {sid} (manifest)", base / value)

    def __len__(self) -> int:
        return len(self._exact)

    def conflict(self, target: PathLike) -> tuple[str, str, Path] | None:
        """``("is", label, input)`` or ``("holds", label, input)`` when writing ``target`` would destroy an input."""
        r = resolved(target)
        ident = _identity(r)
        k = _key(r)
        if k in self._exact:
            return ("is", *self._exact[k])
        if ident is not None and ident in self._exact_id:
            return ("is", *self._exact_id[ident])
        if k in self._holders:
            return ("holds", *self._holders[k])
        if ident is not None and ident in self._holder_id:
            return ("holds", *self._holder_id[ident])
        return None

    def check(self, target: PathLike, option: str, root: PathLike | None = None) -> Path:
        """``target`` when the tool may write, replace or delete it; else an InputError naming ``option`` and the
        input it would destroy (or the root it would leave)."""
        target = Path(target)
        if root is not None and not is_within(target, root, follow_last=False):
            raise InputError(f"{option}: {target} would be written outside {root}", path=target)
        found = self.conflict(target)
        if found is not None:
            relation, label, source = found
            if relation == "is":
                problem = f"{option} would overwrite the input {label} ({source})"
            else:
                problem = f"{option} would replace or delete a folder that holds the input {label} ({source})"
            raise InputError(f"{problem}; inputs are never written: choose another {option}", path=target)
        return target

    def check_all(self, targets: Iterable[PathLike], option: str, root: PathLike | None = None) -> None:
        for target in targets:
            self.check(target, option, root)


# ------------------------------------------------------------------------------------------ fingerprints
def fingerprint(path: PathLike) -> dict:
    """Content fingerprint of one input file (see the module docstring); ``size`` -1 for a missing file."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        return {"path": str(p), "size": -1}
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        if st.st_size <= FULL_HASH_MAX_BYTES:
            scope = "full"
            for block in iter(lambda: fh.read(EDGE_BYTES), b""):
                digest.update(block)
        else:
            scope = "first+last MiB"
            digest.update(fh.read(EDGE_BYTES))
            fh.seek(-EDGE_BYTES, os.SEEK_END)
            digest.update(fh.read(EDGE_BYTES))
    return {
        "path": str(p),
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "sha256": digest.hexdigest(),
        "hashed": scope,
    }


def fingerprint_files(files: Mapping[str, PathLike | None]) -> dict:
    """``{role: fingerprint or None}`` for every role (None: no file in that role)."""
    return {role: (None if path is None else fingerprint(path)) for role, path in files.items()}


def _same_file_content(old: dict | None, new: dict | None) -> bool:
    if old is None or new is None:
        return old is None and new is None
    if "sha256" not in old:
        return False  # recorded by an older version (path and size only): not a content fingerprint
    keys = ["path", "size", "sha256", "hashed"]
    if new.get("hashed") != "full":
        keys.append("mtime_ns")  # only part of the content was hashed: a newer file counts as changed
    return all(old.get(k) == new.get(k) for k in keys)


def stale_roles(recorded: Mapping | None, current: Mapping) -> list[str]:
    """Roles whose file differs from the recorded fingerprint (path, content, or a role added or removed)."""
    recorded = recorded or {}
    roles = list(dict.fromkeys([*current, *recorded]))
    return [role for role in roles if not _same_file_content(recorded.get(role), current.get(role))]


# -------------------------------------------------------------------------------------- locks and temps
@contextmanager
def output_lock(root: PathLike, tool: str, option: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold ``root/name`` for the whole run; a second run on the same root refuses at once (one line)."""
    from filelock import FileLock, Timeout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"another {tool} run is writing to this {option} folder (it holds {path.name}); wait for "
            f"it to finish or choose another {option}",
            path=root,
        ) from None
    except (OSError, NotImplementedError) as err:  # a file system without locks: the temp rules still hold
        print(f"{tool}: warning: cannot lock {path} ({err}); make sure no other run writes to {root}", file=sys.stderr)
        yield path
        return
    try:
        yield path
    finally:
        lock.release()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def owned_temp_prefix(kind: str, name: str) -> str:
    """``.<kind>.<name>.<host>-p<pid>.``: the owner of a temporary folder can be told from its name."""
    return f".{kind}.{name}.{_host()}-p{os.getpid()}."


_OWNED = re.compile(r"^\.(?P<kind>[a-z]+)\.(?P<name>[A-Za-z0-9_-]+)\.(?P<host>[A-Za-z0-9-]+)-p(?P<pid>\d+)\.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def temp_owner_gone(folder_name: str) -> bool:
    """True only when the name records an owner on this host whose process no longer exists. Temps of another
    host, or of the old unlabelled format, are kept: their owner cannot be checked from here."""
    m = _OWNED.match(folder_name)
    if m is None or m["host"] != _host():
        return False
    return not _pid_alive(int(m["pid"]))


def remove_abandoned_temps(folder: PathLike, kinds: Iterable[str], name: str) -> list[Path]:
    """Delete ``folder/.<kind>.<name>.*`` temps whose owner is gone; return what was removed."""
    removed = []
    for kind in kinds:
        for stale in Path(folder).glob(f".{kind}.{name}.*"):
            if temp_owner_gone(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


__all__ = [
    "RunInputs",
    "check_name",
    "child",
    "fingerprint",
    "fingerprint_files",
    "is_within",
    "output_lock",
    "owned_temp_prefix",
    "remove_abandoned_temps",
    "resolved",
    "stale_roles",
    "temp_owner_gone",
]
