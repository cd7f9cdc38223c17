"""TRL 1.12's config classes, field by field: from the installed TRL when there is one, else as
recorded from it in ``trl_1_12_fields.json`` (CI installs no TRL)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

RECORDED = Path(__file__).parent / "trl_1_12_fields.json"


def trl_config_fields(name: str) -> tuple[list[str], dict[str, object]]:
    """The field names of TRL's config class ``name`` (``DPOConfig`` ...) and the defaults of the
    fields tether accepts only at TRL's default."""
    try:
        import trl
    except ImportError:
        recorded = json.loads(RECORDED.read_text())
        return recorded[name], recorded["unsupported_defaults"]
    fields = dataclasses.fields(getattr(trl, name))
    return [f.name for f in fields], {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def trl_defaults(name: str) -> dict[str, object]:
    """The defaults of TRL 1.12's config class ``name``, as recorded (plain JSON values: an
    enum's value, a factory's product)."""
    return json.loads(RECORDED.read_text())["defaults"][name]


def unknown_to_tether(fields: list[str], ours) -> list[str]:
    """TRL's ``fields`` that tether's config class ``ours`` neither has, notes, accepts at TRL's
    default, nor reads under another name."""
    from tether.config import ALIASES, NOTED_FIELDS, UNSUPPORTED_FIELDS

    known = {f.name for f in dataclasses.fields(ours)} | set(NOTED_FIELDS) | set(UNSUPPORTED_FIELDS) | set(ALIASES)
    return sorted(set(fields) - known)
