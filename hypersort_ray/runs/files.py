"""Checksums and verified reads, shared by the checkpoint and the model-folder formats.

A folder of ours lists the sha256 of every file it holds in a manifest (``meta.json``, ``part_rank*.json``,
``model.json``); readers go through :class:`VerifiedFiles`, which checks a file's bytes against the
manifest before anything parses them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hypersort_ray.errors import RunError

__all__ = ["VerifiedFiles", "read_json_object", "sha256_bytes", "sha256_file"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path: Path, what: str, error: type[Exception] = RunError) -> dict[str, Any]:
    """A JSON object from ``path``; ``error`` (naming the file and ``what`` it is) otherwise."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: {what} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return data


class VerifiedFiles:
    """Reads files of one folder, checking each against the sha256 its manifest records.

    Args:
        dirpath: the folder.
        error: the exception type raised (named after what the folder is for the caller).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_bytes(b"hi")
        >>> files = VerifiedFiles(d)
        >>> files.expect({"a.txt": sha256_bytes(b"hi")}, "manifest.json")
        >>> files.read("a.txt")
        b'hi'
    """

    def __init__(self, dirpath: Path, error: type[Exception] = RunError) -> None:
        self.dirpath = Path(dirpath)
        self.error = error
        self.expected: dict[str, str] = {}

    def expect(self, files: Any, source: str) -> None:
        """Add a manifest's ``{name: sha256}``; two manifests that disagree mean a mixed folder."""
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise self.error(f"{self.dirpath / source}: 'files' must map file names to sha256 strings")
        for name, sha in files.items():
            if name in self.expected and self.expected[name] != sha:
                raise self.error(
                    f"{self.dirpath / source}: records a different checksum for {name} than another manifest "
                    "(the folder mixes files of two saves)"
                )
            self.expected[name] = sha

    def read(self, name: str) -> bytes:
        """The bytes of ``name`` after checking them against the manifest."""
        path = self.dirpath / name
        if name not in self.expected:
            raise self.error(f"{path}: not listed in the folder's manifest; the folder is inconsistent")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self.error(f"{path}: missing (listed in the folder's manifest)") from None
        except OSError as exc:
            raise self.error(f"{path}: cannot be read ({exc})") from exc
        digest = sha256_bytes(data)
        if digest != self.expected[name]:
            raise self.error(
                f"{path}: checksum mismatch (file is corrupt, truncated or replaced: {len(data)} bytes, "
                f"sha256 {digest[:12]}..., expected {self.expected[name][:12]}...)"
            )
        return data
