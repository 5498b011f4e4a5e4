"""Files written so that a crash never leaves half of one: atomic text, JSON, tensors, directories, figures.

Every output of a stage goes through here. A file is written to a temporary name beside its
target, flushed to disk, then renamed over the target, so a reader sees the old file or the new
one, never a torn one; a directory is built under a temporary name and swapped in whole. JSON is
strict (no NaN or Infinity tokens: non-finite floats become null), so every JSON reader accepts it.
`cached` keeps a finished piece of a long stage, keyed by what it was computed from, so an
interrupted stage resumes without redoing it.

Faults. A file damaged after it was written (a truncated copy, a flipped bit on disk) is never
read as good: tensor files carry a sha256 of their contents, checked on load (`save_torch_atomic`,
`load_torch_verified`), and unreadable JSON is an error naming the file (`read_json`) or, for a
`cached` piece, recomputed. A full disk (ENOSPC, or a quota) while writing leaves the previous file
as it was and is one line saying where to free how much (`disk_full_error`). Stale temporary files
of a killed writer (`.NAME.*.tmp`, `.NAME.old`) are never read; `remove_stale_temporaries` deletes
them once no writer can be running (the run directory's lock is held).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from dpnb import faults
from dpnb.errors import DpnbError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

T = TypeVar("T")

FIGURE_DPI = 110



def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _reject_non_finite(value: Any) -> Any:
    """JSON has no infinity or NaN; write them as null so every JSON reader accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _reject_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reject_non_finite(v) for v in value]
    return value


def to_json(obj: Any) -> str:
    """Strict JSON (no NaN/Infinity tokens) with dataclasses, paths and numpy scalars converted."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_reject_non_finite(plain), indent=2, sort_keys=False, allow_nan=False) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created_normally(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; give them the permissions open() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


# --------------------------------------------------------------------------- a full disk


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the device (or the user's quota) has no room left."""
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc))


def disk_full_error(directory: Path, what: str, nbytes: int) -> DpnbError:
    """The one line a full disk gets: which directory, what was being written and how much, and the fix."""
    size = f"{max(nbytes, 1) / 2**20:.1f} MiB"
    return DpnbError(
        f"no space left on the device holding {directory} while writing {what} ({size}); nothing was "
        f"replaced (a previous {what} is kept as it was). Free at least {size} there (old runs, or a sweep's "
        f"shared/ caches, are the big files) and rerun the same command")


# --------------------------------------------------------------------------- one file


@contextlib.contextmanager
def _atomic_file(path: Path, binary: bool = False, private: bool = False, expected_bytes: int = 0) -> Iterator[IO]:
    """A temporary file beside `path` for the block to fill, then flushed to disk and renamed over `path`.

    On any failure the temporary file is removed and `path` is untouched; a full disk becomes
    `disk_full_error` (`expected_bytes`, when larger than what was written, is the size reported).
    `private` keeps mkstemp's 0600 mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if not private:
            _as_if_created_normally(Path(tmp))
        faults.reached(f"write {path.name}")
        os.replace(tmp, path)
    except BaseException as exc:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.stat(tmp).st_size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full_error(path.parent, path.name, max(written, expected_bytes)) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new, never half."""
    path = Path(path)
    with _atomic_file(path, expected_bytes=len(text.encode("utf-8"))) as handle:
        handle.write(text)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as strict JSON (non-finite floats become null)."""
    return write_text_atomic(path, to_json(obj))


class DamagedFile(DpnbError):
    """A file that exists but cannot be what was written: truncated, corrupted, or without its checksum."""


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise DpnbError(f"{path} does not exist: run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # written atomically: damaged afterwards
        raise DamagedFile(f"{path} is damaged (not valid JSON: {str(exc).splitlines()[0]}); rerun the stage that "
                          f"writes it with --force, or restore the file") from None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so a crash keeps every line written so far."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_reject_non_finite(json.loads(json.dumps(record, default=_json_default))))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file, ignoring a torn last line left by a crash mid-write."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when the block succeeds.

    An existing `final` is replaced only after the new one is complete, so an interrupted write
    leaves the previous version intact (a full disk while filling it: `disk_full_error`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    _as_if_created_normally(staging, directory=True)
    try:
        yield staging
        faults.reached(f"write {final.name}/")
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException as exc:
        written = _tree_size(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(final.parent, f"{final.name}/", written) from None
        raise


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# Names of the temporary entries the writers here make beside their targets (mkstemp/mkdtemp names
# `.NAME.XXXXXXXX.tmp`, a figure's `.NAME.tmp`, a replaced directory's `.NAME.old`).
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)$")


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete the temporary files and directories that killed writers left under `root`; return how many.

    Only safe while no writer can be running there (`dpnb.runlock.RunLock` is held): a live
    writer's temporary file would be deleted under it.
    """
    removed = 0
    for path in sorted((p for p in Path(root).rglob(".*") if _TEMPORARY.match(p.name)), key=lambda p: len(p.parts)):
        if not os.path.lexists(path):  # inside a stale directory removed just before
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def publish_once(final: str | os.PathLike, fill: Callable[[Path], None]) -> bool:
    """Build a private (0700) directory with `fill(staging)` and rename it to `final` in one step, unless
    another process published `final` first; True when this call published it.

    For work that runs share (`dpnb.rundir.shared_store`): readers see a complete directory or none, a
    directory already there is never replaced under a reader, and any OSError (that one, a full disk)
    drops the staging copy and leaves `final` as it was: whoever needs the work can redo it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))  # mode 0700
    try:
        fill(staging)
        os.rename(staging, final)  # fails when another process published `final` first: theirs is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically (its format from the file suffix) and return the path."""
    path = Path(path)
    with _atomic_file(path, binary=True) as handle:
        figure.savefig(handle, dpi=FIGURE_DPI, format=path.suffix.lstrip("."))
    return path


# --------------------------------------------------------------------------- tensor files with a checksum

CHECKSUM_KEY = "content_sha256"


def content_digest(obj: Any) -> tuple[str, int]:
    """sha256 of a saved state's contents (tensors, arrays, containers, plain values) and its tensor bytes.

    It hashes what was saved, not the file's bytes, so it can travel inside the file: a load that
    gives other contents (a flipped bit in a tensor, a damaged pickle) has another digest.
    """
    import numpy as np
    import torch

    digest, total = hashlib.sha256(), 0

    def feed(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{flat.dtype}{tuple(value.shape)};".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
            total += flat.numel() * flat.element_size()
        elif isinstance(value, np.ndarray):
            digest.update(f"A{value.dtype}{value.shape};".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
            total += value.nbytes
        elif isinstance(value, dict):
            digest.update(f"D{len(value)};".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)};".encode())
            for item in value:
                feed(item)
        elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic, torch.dtype)):
            digest.update(f"{type(value).__name__}:{value!r};".encode())
        else:
            raise TypeError(f"content_digest cannot hash a {type(value).__name__}")

    feed(obj)
    return digest.hexdigest(), total


def save_torch_atomic(path: str | os.PathLike, state: dict[str, Any], private: bool = False) -> Path:
    """`torch.save` a dict atomically (fsynced, renamed into place) with the digest of its contents.

    `load_torch_verified` checks the digest. `private` keeps the file readable by its owner only.
    """
    import torch

    path = Path(path)
    digest, nbytes = content_digest(state)
    with _atomic_file(path, binary=True, private=private, expected_bytes=nbytes) as handle:
        torch.save({**state, CHECKSUM_KEY: digest}, handle)
    return path


def load_torch_verified(path: str | os.PathLike, mmap: bool = False, weights_only: bool = True) -> dict[str, Any]:
    """The dict `save_torch_atomic` wrote to `path`; `DamagedFile` when the file cannot be that.

    Truncated, corrupted (its contents no longer match their digest) or saved without a digest:
    the caller decides whether to rebuild it or to refuse with the fix.
    """
    import torch

    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated or corrupted archive, or a pickle that no longer unpickles
        raise DamagedFile(f"{path} is damaged (unreadable: {str(exc).splitlines()[0][:160]})") from None
    if not isinstance(saved, dict) or CHECKSUM_KEY not in saved:
        raise DamagedFile(f"{path} holds no checksum of its contents (written by an older dpnb, or not by dpnb)")
    claimed = saved.pop(CHECKSUM_KEY)
    if content_digest(saved)[0] != claimed:
        raise DamagedFile(f"{path} is damaged (its contents do not match the checksum saved with them)")
    return saved


def cached(path: str | os.PathLike, key: str, compute: Callable[[], T], *,
           encode: Callable[[T], Any] | None = None, decode: Callable[[Any], T] | None = None) -> T:
    """The result kept at `path` by an earlier, interrupted run with the same `key`, else `compute()`.

    `key` names everything the result depends on (a config fingerprint, say): a result computed
    from other inputs is recomputed, never reused. The result is written atomically as JSON
    (through `encode`, read back through `decode`, for values JSON cannot hold directly).
    """
    path = Path(path)
    if path.exists():
        try:
            saved = read_json(path)
        except DamagedFile as why:  # a kept piece is only a shortcut: recompute it
            print(f"{why.args[0].split(';')[0]}: computing it again")
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key and "result" in saved:
            return decode(saved["result"]) if decode else saved["result"]
    result = compute()
    write_json_atomic(path, {"key": key, "result": encode(result) if encode else result})
    return result
