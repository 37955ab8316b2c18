"""Structure checks of the gradwatch package: layering of its modules and the length of its functions.

    python tools/check_structure.py          # exits 1 on a violation, printing each

* **Layers**: every module has a level (``LAYERS``, lowest first); a module may
  import (at the top or inside a function) only modules of a lower level, so
  there is no import circle and no arrow pointing up.
* **Function length**: no function or method has more than ``MAX_LINES``
  lines of code (from its first statement after the docstring to its end;
  the signature and the docstring are not counted), except ``ALLOWED_LONG``.
* **The watch**: the ``GradWatch`` class has at most ``MAX_WATCH_LINES`` lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gradwatch"
MAX_LINES = 40
MAX_WATCH_LINES = 450
#: argparse declarations read best as one block
ALLOWED_LONG = {"cli.build_parser"}
#: lowest first; a module may import only from earlier groups
LAYERS: list[list[str]] = [
    ["_compat", "_validate"],
    ["_params", "syncs"],
    ["detect"],
    ["incidents"],
    ["history", "contrib"],
    ["_layout", "norms"],
    ["plot", "distributed"],
    ["sinks"],
    ["clip"],
    ["forensics", "gate", "stats"],
    ["_parts"],
    ["_store"],
    ["watch"],
    ["integrations", "cli"],
    ["__init__"],
]
LEVEL = {name: i for i, group in enumerate(LAYERS) for name in group}


def module_of(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" or len(rel.parts) > 1 else "__init__"


def imported(tree: ast.AST, path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package folder
                base = path.relative_to(PKG).parent.parts[: len(path.relative_to(PKG).parent.parts) - node.level + 1]
                target = [*base, *(node.module or "").split(".")] if node.module else list(base)
                if target and target[0]:
                    out.add(target[0])
            elif node.module and node.module.startswith("gradwatch."):
                part = node.module.split(".")[1]
                out.add(part)
                if part == "__init__":
                    out.add("__init__")
            elif node.module == "gradwatch":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gradwatch."):
                    out.add(a.name.split(".")[1])
    return out


def in_type_checking(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if hasattr(sub, "lineno"):
                    lines.add(sub.lineno)
    return lines


def main() -> int:
    problems: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_of(path)
        src = path.read_text()
        tree = ast.parse(src)
        if mod not in LEVEL:
            problems.append(f"{path}: module {mod!r} has no layer in tools/check_structure.py")
            continue
        typing_only = in_type_checking(tree)
        tree_no_tc = ast.parse(
            "\n".join(line if i + 1 not in typing_only else "" for i, line in enumerate(src.splitlines()))
        )
        for dep in sorted(imported(tree_no_tc, path) - {mod}):
            if dep in LEVEL and LEVEL[dep] >= LEVEL[mod]:
                problems.append(
                    f"{path.relative_to(PKG.parent)}: imports gradwatch.{dep} (layer {LEVEL[dep]}) "
                    f"from layer {LEVEL[mod]}"
                )
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:] or body  # the docstring does not count
                n = node.end_lineno - body[0].lineno + 1
                if n > MAX_LINES and f"{path.stem}.{node.name}" not in ALLOWED_LONG:
                    problems.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.name} has {n} lines")
    watch = next(n for n in ast.parse((PKG / "watch.py").read_text()).body if getattr(n, "name", "") == "GradWatch")
    watch_lines = watch.end_lineno - watch.lineno + 1
    if watch_lines > MAX_WATCH_LINES:
        problems.append(f"gradwatch/watch.py: GradWatch has {watch_lines} lines (at most {MAX_WATCH_LINES})")
    ok = f"structure OK: layers, functions <= {MAX_LINES} lines, GradWatch {watch_lines} lines"
    print("\n".join(problems) if problems else ok)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
