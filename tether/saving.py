"""Writing outputs so that a crash never leaves a half-written file in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def save_pretrained_atomic(target: str | Path, objects, state_dict: dict | None = None) -> None:
    """``save_pretrained`` every object into ``target`` via a temporary folder beside it
    (``state_dict``: the first object's weights, gathered from a sharded engine).

    Each file is written completely in the temporary folder, then moved into place with an
    atomic rename, so a reader of ``target`` sees either the old file or the new one.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for index, obj in enumerate(objects):
            if index == 0 and state_dict is not None:
                obj.save_pretrained(staging, state_dict=state_dict)
            else:
                obj.save_pretrained(staging)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                destination = target / path.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
