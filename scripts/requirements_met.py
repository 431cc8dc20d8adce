"""Exit 0 when every requirement of diffora_lab (and of the extras named) is installed at a version
pyproject.toml allows, else 1, naming the first one that is not: scripts/test.sh then links the
checkout only (`pip install --no-deps -e .`) instead of resolving every dependency again.

    python3 scripts/requirements_met.py dev decoder "torch==2.13.0"

Arguments are extras of pyproject.toml or further requirements. Where it cannot tell (Python 3.10
has no tomllib; no `packaging`), it says no, and the caller installs as usual.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path


def unmet(wanted: list[str]) -> str | None:
    """The first requirement not met, or None when all are."""
    try:
        import tomllib
        from packaging.requirements import Requirement
    except ImportError as missing:
        return f"cannot check ({missing.name} not importable)"
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    lines = list(project["dependencies"])
    for item in wanted:
        lines += extras[item] if item in extras else [item]
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return f"{requirement.name} is not installed"
        if not requirement.specifier.contains(version, prereleases=True):
            return f"{requirement.name} {version} is installed, {line} is wanted"
    return None


if __name__ == "__main__":
    missing = unmet(sys.argv[1:])
    if missing:
        print(f"requirements_met: {missing}")
    sys.exit(1 if missing else 0)
