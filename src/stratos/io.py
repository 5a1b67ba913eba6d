"""Small, careful file helpers shared by every stage: JSONL, atomic writes, hashing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


from stratos.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line."""


class _NonFinite(ValueError):
    """A number JSON cannot hold (NaN, Infinity, 1e999) met while parsing one line."""


def _reject_constant(name: str) -> float:
    # Python's json reads NaN/Infinity/-Infinity although JSON has no such values; one in a
    # data file is a bug upstream that would otherwise surface as a NaN loss or a wrong score.
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise _NonFinite(text)
    return value


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict[str, Any] | None:
    """One JSONL line -> its object, None for a blank line; anything else raises DataError naming the line."""
    try:
        # utf-8-sig on the first line: an editor's byte-order mark is not a reason to refuse a file.
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
    if (nul := raw.find(b"\0")) >= 0:  # valid UTF-8 yet never in a text file: the file is binary
        raise DataError(f"{path}:{lineno}: not UTF-8 text (a NUL byte at byte {nul + 1} of the line: a binary file?)")
    if not line.strip():
        return None
    try:
        # Without its line break, so an error at the end of the line gets that line's column.
        rec = json.loads(line.rstrip("\r\n"), parse_constant=_reject_constant, parse_float=_finite_float)
    except _NonFinite as e:
        raise DataError(f"{path}:{lineno}: non-finite number {e} (JSON has no NaN or Infinity)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer past Python's 4300-digit limit
        raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {json_kind(rec)}")
    return rec


def json_kind(value: Any) -> str:
    """A JSON value's kind in words ("an array", "null"), for messages about data."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; a bad line raises DataError naming it.

    The file is read as bytes and decoded line by line, so text that is not UTF-8 is reported at
    its line rather than as a decoding error with no file named."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as e:  # a read that fails midway (an I/O error, a vanished mount)
                raise DataError(f"{path}:{lineno + 1}: cannot read file: {e.strerror or e}") from None
            if not raw:
                return
            lineno += 1
            rec = _parse_line(path, lineno, raw)
            if rec is not None:
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


def atomic_save_tensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` ``save_file``, published by a rename from a temporary file of this writer's own: a
    reader never sees half a file, and two processes writing the same file (two runs building one cache
    entry at once) each write their own and the last rename wins."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
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


def _file_fingerprint(path: Path, hashed: list[str]) -> str:
    """A file's sha256, from the cache when its stat is unchanged; appends to ``hashed`` when not."""
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
    hashed.append(key)
    return digest


def fingerprint(path: str | Path) -> str:
    """The content hash of a file or a folder: what a result reused from disk (a run's stages, the
    request and probe caches of local teachers, task tokenizers, GGUF conversions) is keyed by, so
    that an edited file is never mistaken for the one a result was made from.

    A file's hash is its bytes' sha256; a folder's covers each file's relative path and bytes
    (hidden files, such as half-written temporaries, are left out). Hashes are cached by path,
    size, mtime and inode, in this process and in ``cache_dir()/fingerprints.json``, so an
    unchanged multi-GB model folder is read once, not on every run. A missing path raises
    FileNotFoundError."""
    path = Path(path)
    hashed: list[str] = []
    if path.is_file():
        digest = _file_fingerprint(path, hashed)
    elif path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path)
            if not any(part.startswith(".") for part in rel.parts):
                h.update(f"{rel.as_posix()}\0{_file_fingerprint(f, hashed)}\0".encode())
        digest = h.hexdigest()
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if hashed:  # one write of the store per call, however many files were new
        try:
            write_json(_fingerprint_store(), _FINGERPRINTS)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return digest
