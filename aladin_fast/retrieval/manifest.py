"""Crash-safe, verified directories for retrieval artefacts (index, feature store, retriever).

Layout of a saved directory ``path``::

    path/manifest.json            the commit point (format version, kind, metadata, checksums)
    path/payload-<hex>/...        the files of the committed version
    path/.lock                    advisory lock held while saving

Saving never touches the committed version: the new files are written into a
fresh ``path/.tmp-<hex>/`` folder and fsynced, the folder is renamed to
``payload-<hex>``, then ``manifest.json`` (itself written to a temp file and
fsynced) replaces the old manifest with one ``os.replace`` -- an atomic rename
on POSIX and Windows. A save that dies at any point (exception, SIGKILL, power
loss after the fsyncs) leaves either the old manifest, pointing at the old
untouched payload, or the new one, pointing at a complete payload. Stale
``.tmp-*`` and unreferenced ``payload-*`` folders are removed by the next save.

Loading verifies the manifest's own checksum, the format version (a newer one
is refused), every file's size (truncation) and SHA-256 (bit flips); the
component loaders then check shapes against the manifest metadata.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import uuid
from typing import Callable, Dict, Optional, Tuple

from .._io import fsync_path as _fsync_path
from .._version import __version__

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ManifestError",
    "save_directory",
    "open_directory",
    "file_sha256",
]

FORMAT_NAME = "aladin-fast-retrieval"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A saved retrieval directory is missing, corrupt, truncated, of another kind or too new."""


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 8 MB chunks (works on files larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_HASH_CHUNK)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _manifest_digest(document: dict) -> str:
    body = {key: value for key, value in document.items() if key != "manifest_sha256"}
    return hashlib.sha256(_canonical(body)).hexdigest()


@contextlib.contextmanager
def _save_lock(path: str):
    """Exclusive advisory lock on ``path/.lock`` so two savers never clean up each other's files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock, saves still atomic
        yield
        return
    with open(os.path.join(path, ".lock"), "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _list_files(root: str) -> Dict[str, Dict[str, object]]:
    """Relative path (with '/') -> {"bytes", "sha256"} for every file under ``root``; fsyncs each."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            if os.path.islink(full) or not os.path.isfile(full):
                raise ManifestError(f"payload writer produced {full!r}, which is not a regular file")
            _fsync_path(full)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            files[relative] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
        _fsync_path(folder, directory=True)
    return files


def _read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        raise ManifestError(f"no saved retrieval directory at {path!r} (not a directory)")
    if not os.path.isfile(manifest_path):
        raise ManifestError(f"{path!r} has no {MANIFEST_NAME}: not a saved aladin-fast retrieval directory")
    try:
        with open(manifest_path, "rb") as handle:
            document = json.loads(handle.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{manifest_path!r} is corrupt (not valid JSON: {err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ManifestError(f"{manifest_path!r} is not an {FORMAT_NAME} manifest")
    version = document.get("format_version")
    if not isinstance(version, int):
        raise ManifestError(f"{manifest_path!r} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path!r} was written with format version {version}, newer than this aladin-fast "
            f"({__version__}) understands (format version {FORMAT_VERSION}); upgrade aladin-fast to load it"
        )
    if document.get("manifest_sha256") != _manifest_digest(document):
        raise ManifestError(f"{manifest_path!r} is corrupt (its own checksum does not match its content)")
    for key in ("kind", "payload", "meta", "files"):
        if key not in document:
            raise ManifestError(f"{manifest_path!r} lacks the field {key!r}")
    return document


def save_directory(path: str, kind: str, meta: dict, write_payload: Callable[[str], Optional[dict]]) -> str:
    """Atomically replace the saved version in ``path`` by a new one.

    Args:
        path: target directory (created if missing; an existing non-empty
            directory must already be a saved retrieval directory).
        kind: what is saved ("student_index", "feature_store", "retriever", ...);
            checked again on load.
        meta: JSON-serialisable metadata (dims, metric, counts, dtype, ...).
        write_payload: ``write_payload(folder)`` writes every file of the new
            version into ``folder``; it may return extra metadata merged into
            ``meta``. If it raises, the previous version stays committed.

    Returns:
        the folder of the committed payload.
    """
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    entries = [name for name in os.listdir(path) if name != ".lock"]
    if entries and MANIFEST_NAME not in entries and not all(
        name.startswith((".tmp-", "payload-")) for name in entries
    ):
        raise ManifestError(
            f"refusing to save into {path!r}: it is a non-empty directory that is not a saved "
            "aladin-fast retrieval directory (choose an empty or new path)"
        )
    with _save_lock(path):
        token = uuid.uuid4().hex
        staging = os.path.join(path, f".tmp-{token}")
        payload_name = f"payload-{token}"
        os.makedirs(staging)
        try:
            extra = write_payload(staging) or {}
            files = _list_files(staging)
            os.replace(staging, os.path.join(path, payload_name))
            _fsync_path(path, directory=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "aladin_fast_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "payload": payload_name,
            "meta": {**meta, **extra},
            "files": files,
        }
        document["manifest_sha256"] = _manifest_digest(document)
        temp_manifest = os.path.join(path, f".tmp-{token}-{MANIFEST_NAME}")
        try:
            with open(temp_manifest, "wb") as handle:
                handle.write(json.dumps(document, indent=2, sort_keys=True).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_manifest, os.path.join(path, MANIFEST_NAME))  # the commit
            _fsync_path(path, directory=True)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp_manifest)
            shutil.rmtree(os.path.join(path, payload_name), ignore_errors=True)
            raise
        for name in os.listdir(path):  # old versions and leftovers of interrupted saves
            if name != payload_name and (name.startswith(".tmp-") or name.startswith("payload-")):
                target = os.path.join(path, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(target)
    return os.path.join(path, payload_name)


def _verify_files(path: str, document: dict, verify: bool) -> str:
    payload = os.path.join(path, document["payload"])
    if not os.path.isdir(payload):
        raise FileNotFoundError(payload)
    for relative, entry in sorted(document["files"].items()):
        full = os.path.join(payload, *relative.split("/"))
        if not os.path.isfile(full):
            raise FileNotFoundError(full)
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise ManifestError(
                f"{full!r} is truncated or was modified: expected {entry['bytes']} bytes, found {size}"
            )
        if verify and file_sha256(full) != entry["sha256"]:
            raise ManifestError(f"{full!r} is corrupt: its SHA-256 does not match the manifest")
    return payload


def open_directory(path: str, kind: str, verify: bool = True) -> Tuple[str, dict]:
    """Check a saved directory and return ``(payload folder, meta)``.

    Args:
        path: a directory written by :func:`save_directory`.
        kind: the expected kind; another kind raises :class:`ManifestError`.
        verify: hash every file (SHA-256). Sizes, the manifest checksum and
            the format version are always checked.

    Raises:
        ManifestError: missing/corrupt manifest, newer format version, wrong
            kind, a truncated, missing or altered file.
    """
    path = os.path.abspath(path)
    for attempt in range(2):
        document = _read_manifest(path)
        if document["kind"] != kind:
            raise ManifestError(f"{path!r} holds a saved {document['kind']!r}, not a {kind!r}")
        try:
            return _verify_files(path, document, verify), document["meta"]
        except FileNotFoundError as err:
            # a concurrent save may have committed and cleaned up between our reads: retry once
            if attempt == 0 and _read_manifest(path)["payload"] != document["payload"]:
                continue
            raise ManifestError(f"{path!r} is incomplete: {err.filename or err} listed in the manifest is missing") from err
    raise ManifestError(f"{path!r} changed twice while loading")  # pragma: no cover
