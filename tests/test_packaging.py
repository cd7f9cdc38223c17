"""The installable package: ranges a user can live with, and the exact tested set inside them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_are_ranges_that_hold_the_tested_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = Version(version)
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert not any(spec.operator == "==" for spec in requirement.specifier), f"{requirement}: give a range"
        if name != "torch":  # installed first, on its own (scripts/setup.sh)
            assert name in pinned, f"{name} is not in constraints.txt"
            assert pinned[name] in requirement.specifier, f"constraints.txt's {name} {pinned[name]} is outside {requirement}"
