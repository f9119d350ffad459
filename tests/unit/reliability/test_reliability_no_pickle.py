"""No pickle on the wire or on disk for weights (issue 9, docs/operations.md): a static scan of the project's source.

Parsed with `ast` (not grepped), with import aliases resolved, so `import pickle as p`, `from torch import load`
and a string that merely mentions pickle are told apart. Rules, for every module of the five packages and bench/:

- no import of a pickle-based serializer (pickle, cloudpickle, dill, joblib, shelve, ...);
- `torch.load` only with `weights_only=True`; `numpy.load` never with `allow_pickle` other than False;
  no `torch.save`, `torch.jit.save/load`, `pandas.read_pickle`/`to_pickle`; no `save_pretrained(...,
  safe_serialization=False)` nor `from_pretrained(..., use_safetensors=False)`;
- DeepSpeed's `engine.save_checkpoint` / `engine.load_checkpoint` (torch.save/torch.load of model + optimizer
  state) exactly at the one documented place: the learner's resumable checkpoint on its local disk
  (`learner/checkpoints.py` function `save_checkpoint`, `learner/engine.py` function `resume`). That file never
  travels: what travels (weight pushes, exported weights for actors and catch-up) is safetensors, checked at run
  time below.

Tests may build hostile inputs (a `torch.save` file pushed to an actor must be refused) but must not load pickle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("actor_service", "buffer", "reward", "learner", "deploy", "problems", "common", "bench")

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "pickletools",
                  "copyreg"}
ALWAYS_FORBIDDEN_CALLS = {"torch.jit.save", "torch.jit.load", "pandas.read_pickle", "numpy.lib.format.read_array"}
PROJECT_ONLY_FORBIDDEN_CALLS = {"torch.save"}  # tests may write a pickle file as hostile input
DEEPSPEED_CHECKPOINT_METHODS = {"save_checkpoint", "load_checkpoint"}
ALLOWED_DEEPSPEED_CALLS = {
    # (file, enclosing function, method): the learner's own resumable DeepSpeed checkpoint (local disk only)
    ("learner/checkpoints.py", "save_checkpoint", "save_checkpoint"),
    ("learner/engine.py", "resume", "load_checkpoint"),
    ("learner/guard.py", "respond", "load_checkpoint"),  # the stability guard's rollback to the learner's own
}


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if ".venv" not in p.parts)


def repo_test_sources() -> list[Path]:
    return sorted((REPO / "tests").rglob("*.py"))


class Scan(ast.NodeVisitor):
    """Collects violations in one module; `aliases` maps local names to dotted module paths."""

    def __init__(self, rel: str, project: bool) -> None:
        self.rel = rel
        self.project = project
        self.aliases: dict[str, str] = {}
        self.func_stack: list[str] = []
        self.violations: list[str] = []
        self.deepspeed_calls: list[tuple[str, str, str]] = []

    def _where(self, node: ast.AST) -> str:
        return f"{self.rel}:{getattr(node, 'lineno', '?')}"

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in PICKLE_MODULES:
                self.violations.append(f"{self._where(node)}: import {a.name}")
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if mod.split(".")[0] in PICKLE_MODULES:
            self.violations.append(f"{self._where(node)}: from {mod} import ...")
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{mod}.{a.name}" if mod else a.name
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.func_stack.append(node.name)
        self.generic_visit(node)
        self.func_stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def dotted(self, node: ast.AST) -> str | None:
        """`np.load` -> `numpy.load` (through the module's import aliases); None for non-name expressions."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        head = self.aliases.get(node.id, node.id)
        return ".".join([head, *reversed(parts)])

    @staticmethod
    def kw(node: ast.Call, name: str) -> ast.expr | None:
        return next((k.value for k in node.keywords if k.arg == name), None)

    @staticmethod
    def is_const(node: ast.expr | None, value: object) -> bool:
        return isinstance(node, ast.Constant) and node.value is value

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        where = self._where(node)
        if name is not None:
            if name == "torch.load" and not self.is_const(self.kw(node, "weights_only"), True):
                self.violations.append(f"{where}: torch.load without weights_only=True")
            if name == "numpy.load" and self.kw(node, "allow_pickle") is not None \
                    and not self.is_const(self.kw(node, "allow_pickle"), False):
                self.violations.append(f"{where}: numpy.load with allow_pickle")
            forbidden = ALWAYS_FORBIDDEN_CALLS | (PROJECT_ONLY_FORBIDDEN_CALLS if self.project else set())
            if name in forbidden:
                self.violations.append(f"{where}: {name}")
        if isinstance(node.func, ast.Attribute):
            attr = node.func.attr
            if attr == "to_pickle":
                self.violations.append(f"{where}: .to_pickle()")
            if attr == "save_pretrained" and self.is_const(self.kw(node, "safe_serialization"), False):
                self.violations.append(f"{where}: save_pretrained(safe_serialization=False)")
            if attr == "from_pretrained" and self.is_const(self.kw(node, "use_safetensors"), False):
                self.violations.append(f"{where}: from_pretrained(use_safetensors=False)")
            if attr in DEEPSPEED_CHECKPOINT_METHODS and self.project:
                func = self.func_stack[-1] if self.func_stack else "<module>"
                self.deepspeed_calls.append((self.rel, func, attr))
        self.generic_visit(node)


def scan(path: Path, project: bool) -> Scan:
    s = Scan(path.relative_to(REPO).as_posix(), project)
    s.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return s


def test_the_scanner_catches_what_it_should() -> None:
    """The rules fire on each forbidden form (and stay quiet on the allowed ones), so a clean scan means something."""
    src = '''
import pickle as p
from dill import dumps
import torch as T
import numpy as np
from torch import load
def f(engine, m):
    T.load("x")
    load("x", weights_only=False)
    T.save({}, "x")
    np.load("x", allow_pickle=True)
    T.jit.save(m, "x")
    m.save_pretrained("d", safe_serialization=False)
    engine.save_checkpoint("d")
    T.load("x", weights_only=True)           # fine
    np.load("x", allow_pickle=False)         # fine
    s = "pickle is mentioned in a string"    # fine
'''
    tree = ast.parse(src)
    s = Scan("bench/probe.py", project=True)
    s.visit(tree)
    text = "\n".join(s.violations)
    for expected in ("import pickle", "from dill", "torch.load without", "torch.save", "allow_pickle",
                     "torch.jit.save", "safe_serialization=False"):
        assert expected in text, (expected, text)
    assert len(s.violations) == 8, text
    assert s.deepspeed_calls == [("bench/probe.py", "f", "save_checkpoint")]


def test_no_pickle_in_project_code() -> None:
    files = project_files()
    assert len(files) > 30 and any(f.name == "train.py" for f in files)
    violations: list[str] = []
    deepspeed_calls: list[tuple[str, str, str]] = []
    for f in files:
        s = scan(f, project=True)
        violations += s.violations
        deepspeed_calls += s.deepspeed_calls
    assert violations == [], "\n".join(violations)
    # the DeepSpeed checkpoint (pickle inside) is used exactly where documented, nowhere else
    assert sorted(deepspeed_calls) == sorted(ALLOWED_DEEPSPEED_CALLS), deepspeed_calls


def test_tests_never_load_pickle() -> None:
    violations = [v for f in repo_test_sources() for v in scan(f, project=False).violations]
    assert violations == [], "\n".join(violations)


def test_exported_weights_are_safetensors_the_actor_accepts(tmp_path: Path) -> None:
    """Run time: what the learner exports (and pushes, and actors catch up from) is a safetensors file that the
    actor's torch-free header check parses, and a torch.save (pickle) file of the same tensors is refused."""
    import torch
    from safetensors.torch import load_file

    from actor_service.weights import WeightsFormatError, read_header
    from learner.weights import export_weights

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    info = export_weights(module, tmp_path / "weights", version=7)
    path = Path(info.path)
    assert path.name.endswith(".safetensors")
    spec = read_header(path)
    assert {k: (v.dtype, v.shape) for k, v in spec.items()} == {
        k: ("F32", tuple(t.shape)) for k, t in module.state_dict().items()
    }
    loaded = load_file(str(path))
    for k, t in module.state_dict().items():
        assert torch.equal(loaded[k], t)
    pickled = tmp_path / "pickled.pt"
    torch.save(module.state_dict(), pickled)  # hostile input: what the actor must refuse
    with pytest.raises(WeightsFormatError):
        read_header(pickled)
