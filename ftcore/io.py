"""Atomic writes and content hashes: a crash never leaves a half-written file that looks whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that is renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        crash_point(f"rename:{path.name}")
        if path.is_dir() and tmp.is_dir():
            # A directory cannot be replaced in one rename; move the old one aside first.
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: FTSTUDY_CRASH_AT=<name> SIGKILLs this process here.

    Used at the most delicate moment of every write (the finished temp file, not yet renamed), so
    tests can prove that a kill there loses nothing and is never read as a whole artifact.
    """
    if os.environ.get("FTSTUDY_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_json(data: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def hash_texts(texts: Iterator[str] | list[str]) -> str:
    """sha256 over the texts in order, each length-prefixed so ['ab','c'] and ['a','bc'] differ."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def hash_file(path: str | os.PathLike, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_dir(path: str | os.PathLike) -> str:
    """sha256 over the relative names and contents of every file under `path` (sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(file.relative_to(root)).encode())
        hash_file(file, h)
    return h.hexdigest()


# --- manifests: a step's files with their checksums, written last ------------------------------

MANIFEST = "manifest.json"


def file_entries(step_dir: str | os.PathLike, files: list[str]) -> dict[str, dict[str, Any]]:
    """sha256, size and modification time of each of `files` (relative to step_dir; a directory stands for every
    file under it)."""
    root = Path(step_dir)
    entries = {}
    for name in files:
        target = root / name
        paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for path in paths:
            stat = path.stat()
            entries[str(path.relative_to(root))] = {"sha256": hash_file(path), "size": stat.st_size,
                                                    "mtime_ns": stat.st_mtime_ns}
    return entries


def entries_digest(entries: dict[str, dict[str, Any]]) -> str:
    """One sha256 over the names and checksums of manifest entries: the content identity of those files."""
    return hashlib.sha256(json.dumps({k: v["sha256"] for k, v in entries.items()}, sort_keys=True).encode()).hexdigest()


def write_manifest(step_dir: str | os.PathLike, files: list[str], known: dict[str, dict[str, Any]] | None = None) -> Path:
    """Record sha256, size and modification time of `files` (plus entries already hashed, `known`). Written last,
    so a step directory without a valid manifest is unfinished or damaged and is never reused."""
    entries = {**(known or {}), **file_entries(step_dir, files)}
    return write_json(entries, Path(step_dir) / MANIFEST)


def verify_manifest(step_dir: str | os.PathLike) -> bool:
    """True when the manifest exists and every file it lists is present with its recorded size and content.

    A file whose size and modification time are the recorded ones, and older than the manifest, is
    taken as unchanged (so large weights are hashed once, when they are recorded; any change after the
    manifest was written gives a time at least as new as the manifest's); any other file is hashed and
    compared: a copied root (new times) stays valid, an edited or truncated file does not.
    """
    root = Path(step_dir)
    try:
        written = (root / MANIFEST).stat().st_mtime_ns
        entries = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for name, entry in entries.items():
        path = root / name
        try:
            stat = path.stat()
        except OSError:
            return False
        if not path.is_file() or stat.st_size != entry["size"]:
            return False
        unchanged = stat.st_mtime_ns == entry.get("mtime_ns") and stat.st_mtime_ns < written
        if not unchanged and hash_file(path) != entry["sha256"]:
            return False
    return True


@contextlib.contextmanager
def step_lock(step_dir: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock for one step directory across processes (released by the kernel if we die)."""
    import fcntl

    root = Path(step_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
