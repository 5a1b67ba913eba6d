"""Small, careful file helpers shared by every stage: JSONL, atomic writes, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


from stratos.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; a bad line raises DataError naming it."""
    path = Path(path)
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror}") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [rec for _, rec in iter_jsonl(path)]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place, replacing any previous one."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def sha256_text(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Root of Stratos' cache: $STRATOS_CACHE, else $XDG_CACHE_HOME/stratos, else ~/.cache/stratos."""
    root = os.environ.get("STRATOS_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stratos"


# path -> (stat key, sha256) of files hashed in this process; also kept on disk between processes.
_FINGERPRINTS: dict[str, tuple[list[int], str]] = {}
_FINGERPRINTS_LOADED = False


def _fingerprint_store() -> Path:
    return cache_dir() / "fingerprints.json"


def _file_fingerprint(path: Path) -> str:
    global _FINGERPRINTS_LOADED
    if not _FINGERPRINTS_LOADED:
        _FINGERPRINTS_LOADED = True
        try:
            stored = json.loads(_fingerprint_store().read_text())
            _FINGERPRINTS.update({k: (list(v[0]), str(v[1])) for k, v in stored.items()})
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            pass  # no store yet, or a damaged one: it is only a cache
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    key = str(path.resolve())
    hit = _FINGERPRINTS.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    digest = sha256_file(path)
    _FINGERPRINTS[key] = (stamp, digest)
    try:
        write_json(_fingerprint_store(), _FINGERPRINTS)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def fingerprint(path: str | Path) -> str:
    """The content hash of a file or a folder: what every reuse of a result (a run's stage, a
    checkpoint, a teacher-signal cache) is keyed by, so that an edited file is never mistaken for the
    one a result was made from.

    A file's hash is its bytes' sha256; a folder's covers each file's relative path and bytes
    (hidden files, such as half-written temporaries, are left out). Hashes are cached by path,
    size, mtime and inode, in this process and in ``cache_dir()/fingerprints.json``, so an
    unchanged multi-GB model folder is read once, not on every run. A missing path raises
    FileNotFoundError."""
    path = Path(path)
    if path.is_file():
        return _file_fingerprint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{_file_fingerprint(f)}\0".encode())
    return h.hexdigest()
