"""The layout holds: no import cycles, every train module imports on its own, the layers point
one way, and benchmarks use public API only (read as text with ast; nothing runs but imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "prep", "train")
# Leading-underscore names of other libraries that our code may touch, with the reason.
ALLOWED_PRIVATE = {
    ("train/data/batches.py", "_typed_storage"): "shared-memory batch, as torch's default_collate",
    ("train/data/batches.py", "_new_shared"): "shared-memory batch, as torch's default_collate",
    ("prep/workers.py", "_exit"): "os._exit: an orphaned worker dies, skipping atexit/pool cleanup",
    ("prep/rank_watch.py", "_exit"): "os._exit: a rank whose launcher is gone, stuck in gloo, ends",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of our packages, subpackages included (a package by its __init__.py)."""
    return {
        module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))
    }


def imports_of(path: Path, names: set[str]) -> set[str]:
    """Our modules that `path` imports, anywhere in the file (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & names
            if node.module in names and len(submodules) < len(node.names):
                found.add(node.module)  # `from package import submodule` needs only that one
            found |= submodules
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & names
    return found


def import_graph() -> dict[str, set[str]]:
    names = set(modules())
    return {name: imports_of(path, names) - {name} for name, path in modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None


# train's layers, lowest first: each may import only those below it (and itself). train.errors
# is a leaf everyone may raise from; train.data imports nothing of train outside itself.
TRAIN_LAYERS = ("train.errors", "train.data", "train.plan", "train.engine", "train.run")
PURE = (
    "train.errors",
    "train.plan",
    "train.data.crops",
    "train.data.samplers",
    "train.data.constants",
    "train.run.report",
)


def train_layer(name: str) -> int:
    """Index in TRAIN_LAYERS; train's top-level modules (the commands) sit above them all."""
    return next(
        (
            i
            for i, layer in enumerate(TRAIN_LAYERS)
            if name == layer or name.startswith(layer + ".")
        ),
        len(TRAIN_LAYERS),
    )


def test_train_subpackages_import_downward_only() -> None:
    """No upward import between train's subpackages; train.data imports nothing of the trainer."""
    graph = import_graph()
    upward = [
        f"{name} -> {dep}"
        for name, deps in graph.items()
        if name.startswith("train.")
        for dep in deps
        if dep.startswith("train.") and train_layer(dep) > train_layer(name)
    ]
    assert not upward, upward
    data_deps = {
        d
        for name, deps in graph.items()
        if name.startswith("train.data")
        for d in deps
        if d.startswith("train") and not d.startswith("train.data")
    }
    assert data_deps == set(), f"train.data must import nothing of the trainer: {data_deps}"


def test_layer_order() -> None:
    assert (
        train_layer("train.data.crops") < train_layer("train.plan") < train_layer("train.run.main")
    )
    assert train_layer("train.run.main") < train_layer("train.cli")
    assert {name for name in modules() if name.startswith("train.")} >= set(TRAIN_LAYERS)


def test_train_top_level_is_small() -> None:
    entries = [
        p.name
        for p in (REPO / "train").iterdir()
        if p.name != "__pycache__" and not p.name.endswith(".so")
    ]
    assert len(entries) <= 12, sorted(entries)


def test_layers_point_one_way() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        package = name.split(".")[0]
        assert package != "formats" or all(d.startswith("formats") for d in deps), name
        assert not (package == "train" and any(d.startswith("prep") for d in deps)), name
        assert not (package == "prep" and any(d.startswith("train") for d in deps)), name
    pure = [name for name in graph if name.startswith(PURE)]
    assert len(pure) >= 10, pure
    for name in pure:  # the pure core: neither torch nor typer at module level
        tree = ast.parse(modules()[name].read_text())
        top = {
            a.name.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.Import)
            for a in node.names
        }
        top |= {
            node.module.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not top & {"torch", "torchvision", "typer"}, name


def test_only_cli_modules_import_typer() -> None:
    for name, path in modules().items():
        text = path.read_text()
        if not name.endswith(".cli"):
            assert "import typer" not in text, name


IMPORT_EACH_ALONE = """
import importlib, sys
ours = ("formats", "prep", "train")
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]  # none of our modules imported before this one
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_train_module_imports_alone() -> None:
    """Each train module imported with none of ours loaded before it (one fresh interpreter;
    third-party imports like torch stay cached between modules, ours are dropped)."""
    names = sorted(name for name in modules() if name.startswith("train."))
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def private_uses(source: str) -> list[tuple[int, str]]:
    """`x._name` with x not self/cls/super(), and `from our_module import _name`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "super":
                continue
            out.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in PACKAGES
        ):
            out += [
                (node.lineno, a.name)
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return out


def test_private_uses_are_found() -> None:
    source = (
        "import x\nx._hidden()\nself._mine()\nsuper()._base().__len__()\n"
        "from train.engine.loop import _Interval\nfrom torch import _C\n"
    )
    assert sorted(private_uses(source)) == [(2, "_hidden"), (5, "_Interval")]
    data = private_uses((REPO / "train" / "data" / "batches.py").read_text())
    assert {name for _, name in data} == {"_typed_storage", "_new_shared"}  # the allowed ones


def test_benchmarks_and_library_use_public_api_only() -> None:
    """bench/ and the bench-facing train code (train bench, train bench-loader) touch no
    leading-underscore name from outside its module; the library crosses module lines only
    through public names too, torch's allowed exceptions aside."""
    paths = sorted((REPO / "bench").rglob("*.py")) + [p for p in modules().values()]
    found = []
    for path in paths:
        relative = str(path.relative_to(REPO))
        for line, name in private_uses(path.read_text()):
            if (relative, name) not in ALLOWED_PRIVATE:
                found.append(f"{relative}:{line} {name}")
    assert not found, found


def test_train_run_and_its_checks_import_no_torch() -> None:
    """`train run --dry-run` prints its table before torch loads (seconds of import)."""
    code = (
        "import sys, train.cli, train.run.main, train.run.shards, train.plan.config as c; "
        "c.Recipe.from_mapping({'arch': 'resnet18', 'drop_path': 0.1}); "
        "loaded = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "sys.exit(f'imported {loaded}' if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
