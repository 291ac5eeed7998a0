"""The import rules of docs/design.md, "Layers", read from the source with ast: which module may import which.

A new module must be placed in a layer here and there; an import against the rules fails with the module, the line
and what it imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# docs/design.md, "Layers": each layer and the layers it may import from (its own always).
LAYERS = {
    "base": ["maskedlm", "errors", "files", "process", "config", "metrics"],
    "data": ["tokenizer", "data", "data.corpus", "data.encode", "data.prepare", "data.shards", "data.loader"],
    "math": ["attention", "model", "masking", "objective", "optim"],
    "ranks": ["distributed", "step"],
    "tasks": ["tasks", "tasks.read", "tasks.encode", "tasks.task", "tasks.load", "tasks.metrics", "tasks.config"],
    "loading": ["checkpoint", "hf", "models", "tasks.heads"],
    "probe": ["probe"],
    "evaluation": ["evaluate"],
    "guards": ["spikes", "autoshape"],
    "commands": ["train", "finetune", "inference", "masks", "report", "interop", "data.distprepare", "demo", "suite"],
    "entry": ["cli", "__main__"],
}
MAY_IMPORT = {
    "base": [],
    "data": ["base"],
    "math": ["base"],
    "ranks": ["base", "math"],
    "tasks": ["base"],
    "loading": ["base", "data", "math", "tasks"],
    "probe": ["base", "data", "tasks"],
    "evaluation": ["base", "data", "math", "ranks", "loading"],
    "guards": ["base", "math", "ranks", "loading"],
    "commands": ["base", "data", "math", "ranks", "tasks", "loading", "probe", "evaluation", "guards"],
    "entry": ["base", "data", "math", "ranks", "tasks", "loading", "probe", "evaluation", "guards", "commands"],  # in functions
}
# Imported inside the functions that need them, never at the top of a module: optional extras, or heavy enough that
# every command would pay for them (matplotlib ~0.5 s, FSDP ~0.9 s).
IN_FUNCTIONS_ONLY = ("transformers", "matplotlib", "pyarrow", "zstandard", "torch.utils.tensorboard",
                     "torch.distributed.fsdp", "torch.distributed.checkpoint")


def _name(path: Path) -> str:
    parts = path.relative_to(SRC / "maskedlm").with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "maskedlm"


MODULES = {_name(p): p for p in sorted((SRC / "maskedlm").rglob("*.py"))}
LAYER_OF = {m: layer for layer, ms in LAYERS.items() for m in ms}


def _ours(dotted: str) -> str | None:
    """maskedlm.X.Y (a module, or a name in module maskedlm.X) → our module's short name; None for other packages."""
    if dotted == "maskedlm":
        return "maskedlm"
    if not dotted.startswith("maskedlm."):
        return None
    parts = dotted[len("maskedlm."):].split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) if parts else "maskedlm"


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(dotted name imported, line, inside a function) for every import in module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                assert child.level == 0, f"{name}:{child.lineno}: a relative import"
                # `from a import b` may import module a.b: both names are recorded
                found.extend((f"{child.module}.{a.name}", child.lineno, inner) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_is_in_exactly_one_layer():
    listed = [m for ms in LAYERS.values() for m in ms]
    assert sorted(listed) == sorted(set(listed)), "a module listed twice"
    assert set(listed) == set(MODULES), f"not in a layer: {set(MODULES) - set(listed)}; gone: {set(listed) - set(MODULES)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_its_own_layer_and_those_below(name):
    allowed = {LAYER_OF[name], *MAY_IMPORT[LAYER_OF[name]]}
    for dotted, line, _ in _imports(name):
        ours = _ours(dotted)
        if ours is not None:
            assert LAYER_OF[ours] in allowed, f"{name}:{line} ({LAYER_OF[name]}) imports {ours} ({LAYER_OF[ours]})"


def test_commands_import_no_other_command_but_the_demo_and_suite_which_compose_them():
    commands = set(LAYERS["commands"])
    for name in commands - {"demo", "suite"}:
        used = {_ours(d) for d, _, _ in _imports(name)} & commands
        assert used <= {name}, f"{name} imports the commands {sorted(used - {name})}"


def _third_party(name: str, in_function: bool | None = None) -> list[tuple[str, int]]:
    return [(d, line) for d, line, inner in _imports(name) if _ours(d) is None
            and d.split(".")[0] not in sys.stdlib_module_names and (in_function is None or inner == in_function)]


def test_torch_distributed_is_used_in_distributed_py_alone():
    for name, path in MODULES.items():
        if name == "distributed":
            continue
        imported = [(d, line) for d, line in _third_party(name) if d == "torch.distributed" or d.startswith("torch.distributed.")]
        assert not imported, f"{name} imports {imported}"
        tree = ast.parse(path.read_text())
        used = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "distributed"
                and isinstance(n.value, ast.Name) and n.value.id == "torch"]
        assert not used, f"{name} uses torch.distributed at lines {used}"


@pytest.mark.parametrize("name", LAYERS["math"])
def test_the_math_imports_torch_and_the_standard_library_only(name):
    others = [(d, line) for d, line in _third_party(name) if d.split(".")[0] != "torch"]
    assert not others, f"{name} imports {others}"


def test_model_py_imports_of_ours_only_the_attention_kernels_and_the_error():
    assert {_ours(d) for d, _, _ in _imports("model")} - {None} == {"attention", "errors"}


def test_function_level_imports_are_the_named_heavy_packages_or_cli_s_commands():
    for name in MODULES:
        for dotted, line, inner in _imports(name):
            heavy = dotted.startswith(tuple(p + "." for p in IN_FUNCTIONS_ONLY)) or dotted in IN_FUNCTIONS_ONLY
            if heavy:
                assert inner, f"{name}:{line} imports {dotted} at the top (keep it in the function that needs it)"
            elif inner:
                assert name == "cli" and _ours(dotted) is not None, f"{name}:{line} imports {dotted} inside a function"


def test_cli_imports_at_its_top_only_the_error_it_reports():
    assert [d for d, _, inner in _imports("cli") if not inner and _ours(d) is not None] == ["maskedlm.errors.UserError"]


@pytest.mark.parametrize("module,absent", [("maskedlm.cli", ("torch", "numpy", "tokenizers")),
                                           ("maskedlm.data.prepare", ("torch",)), ("maskedlm.tokenizer", ("torch",))])
def test_the_command_line_and_prepare_import_no_torch(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_no_import_goes_in_a_circle():
    graph = {name: {_ours(d) for d, _, inner in _imports(name) if not inner} - {None, name} for name in MODULES}
    done: set[str] = set()

    def visit(name, path):
        assert name not in path, "import circle: " + " -> ".join([*path[path.index(name):], name])
        if name not in done:
            for other in sorted(graph[name]):
                visit(other, [*path, name])
            done.add(name)

    for name in sorted(MODULES):
        visit(name, [])
