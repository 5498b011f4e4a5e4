"""Files written so that a crash never leaves half of one: atomic text, JSON, directories and figures.

Every output of a stage goes through here. A file is written to a temporary name beside its
target, flushed to disk, then renamed over the target, so a reader sees the old file or the new
one, never a torn one; a directory is built under a temporary name and swapped in whole. JSON is
strict (no NaN or Infinity tokens: non-finite floats become null), so every JSON reader accepts it.
`cached` keeps a finished piece of a long stage, keyed by what it was computed from, so an
interrupted stage resumes without redoing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _as_if_created_normally(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as strict JSON (non-finite floats become null)."""
    return write_text_atomic(path, to_json(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise DpnbError(f"{path} does not exist: run the stage that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


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
    leaves the previous version intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    _as_if_created_normally(staging, directory=True)
    try:
        yield staging
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, dpi=FIGURE_DPI, format=path.suffix.lstrip("."))
    os.replace(tmp, path)
    return path


def cached(path: str | os.PathLike, key: str, compute: Callable[[], T], *,
           encode: Callable[[T], Any] | None = None, decode: Callable[[Any], T] | None = None) -> T:
    """The result kept at `path` by an earlier, interrupted run with the same `key`, else `compute()`.

    `key` names everything the result depends on (a config fingerprint, say): a result computed
    from other inputs is recomputed, never reused. The result is written atomically as JSON
    (through `encode`, read back through `decode`, for values JSON cannot hold directly).
    """
    path = Path(path)
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return decode(saved["result"]) if decode else saved["result"]
    result = compute()
    write_json_atomic(path, {"key": key, "result": encode(result) if encode else result})
    return result
