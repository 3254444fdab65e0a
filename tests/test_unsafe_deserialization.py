"""No path of the package can turn outside bytes into code: no pickle (nor its cousins), no
eval/exec, torch.load only with weights_only=True, YAML only safe, NIXL's pickling descriptor
serializer never used, RocksDB only in raw mode, chat templates only in jinja2's sandbox."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("pdserve", "engine", "cache", "scheduler", "services", "proto")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve",
                  "jsonpickle", "joblib"}
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
BANNED_METHODS = {"get_serialized_descs", "deserialize_descs", "unsafe_load", "full_load"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str, name: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where} imports {a.name}" for a in node.names
                    if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                out.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f,
                                                                              ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                else ""
            if (isinstance(f, ast.Name) and fname in BANNED_BUILTINS) or fname in BANNED_METHODS:
                out.append(f"{where} calls {fname}")
            if owner == "torch" and fname == "load" and not _is_true(_kw(node, "weights_only")):
                out.append(f"{where} torch.load without weights_only=True")
            if owner == "yaml" and fname in ("load", "load_all"):
                loader = _kw(node, "Loader")
                if loader is None or "Safe" not in ast.unparse(loader):
                    out.append(f"{where} yaml.{fname} without a SafeLoader")
            if owner in ("np", "numpy") and fname == "load" and _is_true(_kw(node, "allow_pickle")):
                out.append(f"{where} numpy.load(allow_pickle=True)")
            if fname == "Options" and owner == "rocksdict" and not _is_true(_kw(node, "raw_mode")):
                out.append(f"{where} rocksdict.Options without raw_mode=True (it pickles values)")
            if fname == "Rdict" and _kw(node, "options") is None:
                out.append(f"{where} rocksdict.Rdict without raw-mode options")
            if fname == "Environment" and owner == "jinja2":
                out.append(f"{where} jinja2.Environment (templates from model files: sandbox)")
        elif isinstance(node, ast.FunctionDef) and node.name in ("__reduce__", "__setstate__"):
            out.append(f"{where} defines {node.name}")
    return out


def package_files() -> list[Path]:
    files = [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40
    return files


def test_the_package_has_no_unsafe_deserialization():
    problems = []
    for p in package_files():
        problems += findings(p.read_text(), str(p.relative_to(ROOT)))
    assert problems == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(b)",
    "from pickle import loads",
    "import marshal",
    "eval(data)",
    "exec(code)",
    "torch.load(f)",
    "torch.load(f, weights_only=False)",
    "yaml.load(s)",
    "yaml.load(s, Loader=yaml.FullLoader)",
    "np.load(f, allow_pickle=True)",
    "agent.get_serialized_descs(descs)",
    "agent.deserialize_descs(blob)",
    "rocksdict.Options()",
    "rocksdict.Rdict(path)",
    "jinja2.Environment()",
    "class A:\n    def __reduce__(self):\n        return (os.system, ('x',))",
])
def test_the_scan_catches_each_pattern(snippet):
    assert findings(snippet, "snippet.py")


@pytest.mark.parametrize("snippet", [
    "torch.load(f, weights_only=True)",
    "yaml.safe_load(s)",
    "yaml.load(s, Loader=yaml.SafeLoader)",
    "rocksdict.Options(raw_mode=True)",
    "jinja2.sandbox.ImmutableSandboxedEnvironment()",
    "model.eval()",  # nn.Module.eval is not builtins.eval
])
def test_the_scan_lets_safe_forms_pass(snippet):
    assert findings(snippet, "snippet.py") == []
