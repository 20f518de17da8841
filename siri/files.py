"""Writing what a user keeps (results, plots, run ids) so that a crash never loses it.

`check_output_dir` refuses a folder that could never be created (a file is in the way).
Each file is written under a temporary name beside its final one, flushed to disk and
renamed over it (`os.replace`, atomic on POSIX): a kill at any point leaves the old file or
the new one, never a torn one. Checkpoint directories get the same treatment in
`siri.checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from siri.errors import UserError

__all__ = ["check_output_dir", "fsync_path", "write_atomically", "write_json_atomically", "write_text_atomically"]


def check_output_dir(key: str, path: str) -> None:
    """UserError naming `key` unless `path` is, or can become, a directory: neither it nor
    any parent is a regular file (checked before any work, not at the first write)."""
    target = probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        where = "is" if probe == target else f"is under {probe!r}, which is"
        raise UserError(f"{key} {path!r} {where} a file, not a directory")


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's entries to disk."""
    # Directories are opened read-only to fsync their entries; some file systems refuse
    # that, which only costs durability against a power loss, never correctness.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)`, then move the file it wrote to `path`."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # `write` failed: drop its partial file, keep the old one
            os.remove(tmp)


def write_text_atomically(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_atomically(path, write)


def write_json_atomically(path: str, obj, **dump_kwargs) -> None:
    """`obj` as JSON; serialised before anything is written, so a value JSON cannot take
    raises with the old file untouched."""
    write_text_atomically(path, json.dumps(obj, **dump_kwargs))
