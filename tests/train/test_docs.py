"""Docs and docstrings name only train modules and functions that exist (read with ast)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOTTED = re.compile(r"(?<![\w./-])train(?:\.[A-Za-z_]\w*)+")
FILE = re.compile(r"(?<![\w./-])train/[\w/]+\.(?:py|c|h)\b")
DOCS = ("README.md", "docs/DESIGN.md", "docs/GPU_RUN.md")


def module_path(dotted: str) -> Path | None:
    base = REPO.joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "__all__" for t in node.targets
        ):
            names |= set(ast.literal_eval(node.value))  # a lazy package's exports
    return names


def missing(name: str) -> bool:
    """True when `name` (train.pkg.module[.attr...]) names no module, nor a name in one."""
    name = name.rstrip(".")
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_path(".".join(parts[:cut]))
        if path is not None:
            rest = parts[cut:]
            return (
                bool(rest)
                and rest[0] not in top_level_names(path)
                and module_path(".".join(parts[: cut + 1])) is None
                and not (REPO.joinpath(*parts[:cut]) / "native" / f"{rest[0]}.c").exists()
            )
    return True


def names_in(text: str) -> set[str]:
    found = {m.group(0) for m in DOTTED.finditer(text)}
    found = {n for n in found if not n.endswith((".py", ".c", ".h", ".json", ".md"))}
    return found


def docstrings() -> dict[str, str]:
    out = {}
    for path in sorted((REPO / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out[f"{path.relative_to(REPO)}:{getattr(node, 'name', 'module')}"] = doc
    return out


def test_the_checker_finds_what_is_missing() -> None:
    assert not missing("train.data.loaders.TrainLoader")
    assert not missing("train.data")
    assert missing("train.data.loaders.NoSuchLoader")
    assert missing("train.augment")


def test_docs_and_docstrings_name_what_exists() -> None:
    texts = {doc: (REPO / doc).read_text() for doc in DOCS} | docstrings()
    bad = [
        f"{where}: {name}"
        for where, text in texts.items()
        for name in sorted(names_in(text))
        if missing(name)
    ]
    bad += [
        f"{where}: {path}"
        for where, text in texts.items()
        for path in sorted(set(FILE.findall(text)))
        if not (REPO / path).exists()
    ]
    assert not bad, bad


def test_module_docstrings_are_short() -> None:
    """1-3 lines saying what the module holds (package docstrings: up to 5); essays go to
    docs/DESIGN.md."""
    long = []
    for path in sorted((REPO / "train").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        limit = 5 if path.name == "__init__.py" else 3
        if doc.count("\n") + 1 > limit:
            long.append(str(path.relative_to(REPO)))
    assert not long, long
