"""Writing outputs so that a crash never leaves a half-written file in place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


MANIFEST = ".tether-manifest.json"


def written_model_files(folder: str | Path) -> list[str]:
    """The files of the model tether last saved into ``folder`` (relative paths), from its
    manifest; none for a folder tether never saved a model into."""
    path = Path(folder) / MANIFEST
    try:
        return list(json.loads(path.read_text()).get("model", []))
    except (OSError, ValueError, AttributeError):
        return []


def remove_model_files(folder: str | Path, keep: set[str] = frozenset()) -> None:
    """Remove the files of the model tether saved into ``folder`` (those not in ``keep``), and
    the staging folders a save killed half-way left beside it."""
    folder = Path(folder)
    for name in set(written_model_files(folder)) - set(keep):
        (folder / name).unlink(missing_ok=True)
    for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_pretrained_atomic(target: str | Path, objects, state_dict: dict | None = None) -> None:
    """``save_pretrained`` every object into ``target`` via a temporary folder beside it
    (``state_dict``: the first object's weights, gathered from a sharded engine).

    Each file is written completely in the temporary folder, then moved into place with an
    atomic rename, so a reader of ``target`` sees either the old file or the new one. The files
    of a model tether saved there before that this save does not write again (an adapter-only
    save's adapter files, shards of another size) are removed, so the folder holds one model;
    the manifest (``.tether-manifest.json``) records which files that model is.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    remove_model_files(target, keep=set(written_model_files(target)))  # only half-written saves
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for index, obj in enumerate(objects):
            if index == 0 and state_dict is not None:
                obj.save_pretrained(staging, state_dict=state_dict)
            else:
                obj.save_pretrained(staging)
        written = [str(path.relative_to(staging)) for path in sorted(staging.rglob("*")) if path.is_file()]
        for name in written:
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            usual_mode(staging / name)  # a library's own temporary file may have left it private
            os.replace(staging / name, destination)
        remove_model_files(target, keep=set(written))
        write_text_atomic(target / MANIFEST, json.dumps({"model": written}, indent=1))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def usual_mode(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would (the umask's), not the
    private ones of a temporary file or folder it was written as."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        usual_mode(Path(temporary))  # mkstemp's is private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
