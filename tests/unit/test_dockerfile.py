"""docker/Dockerfile stays in step with the code (no Docker engine runs in CI): every modmoe
module its build step imports exists, every extra it installs is one pyproject.toml defines
(the data formats' extra among them), every other module the check imports comes with an
installed extra, and every path it copies exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
PROVIDED_BY_IMAGE = {"torch", "megatron", "transformer_engine", "apex"}  # the NGC base image, or megatron-core


def _module_exists(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _installed_extras() -> list[str]:
    return re.findall(r'extras\["([a-z0-9_-]+)"\]', DOCKERFILE) + re.findall(
        r'optional-dependencies"\]\["([a-z0-9_-]+)"\]', DOCKERFILE
    )


def test_issue24_18_every_modmoe_module_the_image_imports_exists():
    named = sorted(set(re.findall(r"\bmodmoe(?:\.[a-z_0-9]+)+", DOCKERFILE)))
    assert named, "the Dockerfile's check step imports no modmoe module"
    assert [m for m in named if not _module_exists(m)] == []


def test_issue24_18_the_image_installs_existing_extras_including_data():
    extras = _installed_extras()
    assert {"megatron", "deepspeed", "data"} <= set(extras), extras
    assert [e for e in extras if e not in EXTRAS] == []


def test_the_check_step_imports_only_what_the_image_installs():
    installed = {
        re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("-", "_")
        for extra in _installed_extras()
        for req in EXTRAS[extra]
    }
    imports = [line for line in DOCKERFILE.splitlines() if 'python -c "import ' in line]
    assert imports
    for line in imports:
        for name in re.search(r'import ([^;"]+)', line).group(1).split(","):
            top = name.strip().split(".")[0]
            assert top == "modmoe" or top in PROVIDED_BY_IMAGE or top in installed, top


def test_every_copied_path_exists():
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            assert all((REPO / s).exists() for s in sources if not s.startswith("--")), line
