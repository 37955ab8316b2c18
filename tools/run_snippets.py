"""Run every Python snippet of the README and the documentation as a standalone script.

A reader copies a snippet into a fresh file and runs it; so does this script:
each snippet is written alone into an empty temporary folder and run there
with a fresh interpreter -- nothing is injected (no ``torch``, no ``gw``), so
a snippet that forgets an import fails here exactly as it would for a reader.

What counts as a snippet:

* Markdown (``README.md``, ``docs/**/*.md``): fenced blocks opened with ```` ```python ````;
* reStructuredText (``docs/**/*.rst``): ``.. code-block:: python``,
  ``.. doctest::`` (run with :mod:`doctest`, outputs compared, empty globals)
  and ``::`` literal blocks (Sphinx highlights them as Python).

A snippet that imports a package that is not installed here (an adapter for
``wandb`` or ``mlflow``: a reader without that package cannot run it either) is
compiled (``ast.parse``) but not run, and listed as such. A snippet that cannot
run as written for another reason -- it needs a service -- is marked in the
source right before it, with a reason the reader sees too:
``<!-- snippet: no-run REASON -->`` in Markdown, ``.. snippet: no-run REASON``
(an rST comment) in reStructuredText; it is compiled and listed, not run.

Usage::

    python tools/run_snippets.py            # every snippet; exit 1 if any fails
    python tools/run_snippets.py --list     # what would run, with locations
    python tools/run_snippets.py docs/quickstart.rst   # only these files
"""

from __future__ import annotations

import argparse
import ast
import doctest
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Pages whose snippets are known not to run alone yet, with why; their failures are printed but do not
#: fail the run. Empty this as the pages are fixed (each snippet made runnable or marked no-run).
PENDING: dict[str, str] = {}
NO_RUN_MD = re.compile(r"^\s*<!--\s*snippet:\s*no-run\s+(.+?)\s*-->\s*$")
NO_RUN_RST = re.compile(r"^\s*\.\.\s+snippet:\s*no-run\s+(.+?)\s*$")
FENCE = re.compile(r"^(\s*)(`{3,})\s*(\S*)\s*$")


@dataclass
class Snippet:
    """One code block: where it is, how to run it, and its text (dedented)."""

    path: Path
    line: int  # 1-based line of the block's first code line
    kind: str  # "script" or "doctest"
    code: str
    no_run: str | None = None  # the reason, when marked no-run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _indented_block(lines: list[str], start: int) -> tuple[int, str]:
    """The indented block that begins at or after ``start`` (blank lines first); returns (first line, text)."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    first = i
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or lines[i][:1] in (" ", "\t")):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    return first, textwrap.dedent("\n".join(body)) + "\n"


def _skip_options(lines: list[str], i: int) -> int:
    """Skip a directive's ``:option:`` lines."""
    while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):
        i += 1
    return i


def _no_run(lines: list[str], i: int, pattern: re.Pattern) -> str | None:
    """A no-run marker on one of the two non-blank lines before line ``i``."""
    seen = 0
    j = i - 1
    while j >= 0 and seen < 2:
        if lines[j].strip():
            m = pattern.match(lines[j])
            if m:
                return m.group(1)
            seen += 1
        j -= 1
    return None


def rst_snippets(path: Path) -> list[Snippet]:
    """The Python code blocks of a reStructuredText file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\.\s+(code-block|code|sourcecode|doctest)::\s*(\S*)", line)
        if m:
            directive, lang = m.group(2), m.group(3).lower()
            if directive == "doctest" or lang in ("python", "python3", "py", "pycon"):
                first, code = _indented_block(lines, _skip_options(lines, i + 1))
                kind = "doctest" if directive == "doctest" or code.lstrip().startswith(">>>") else "script"
                out.append(Snippet(path, first + 1, kind, code, _no_run(lines, i, NO_RUN_RST)))
            i += 1
            continue
        # a "::" literal block (not a directive, not a comment): Sphinx highlights it as Python
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            first, code = _indented_block(lines, i + 1)
            if code.strip():
                kind = "doctest" if code.lstrip().startswith(">>>") else "script"
                out.append(Snippet(path, first + 1, kind, code, _no_run(lines, i + 1, NO_RUN_RST)))
        i += 1
    return out


def md_snippets(path: Path) -> list[Snippet]:
    """The fenced ```python blocks of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if lang in ("python", "python3", "py", "pycon"):
            code = textwrap.dedent("\n".join(lines[i + 1 : j])) + "\n"
            kind = "doctest" if code.lstrip().startswith(">>>") else "script"
            out.append(Snippet(path, i + 2, kind, code, _no_run(lines, i, NO_RUN_MD)))
        i = j + 1
    return out


def default_files() -> list[Path]:
    """README.md and every .rst/.md page of docs/ (not the build folder, not the API stubs)."""
    files = [ROOT / "README.md"]
    for p in sorted((ROOT / "docs").rglob("*")):
        rel = p.relative_to(ROOT / "docs").parts
        if p.suffix in (".rst", ".md") and rel[0] not in ("_build", "_static", "generated", "_autosummary"):
            files.append(p)
    return files


def collect(files: list[Path]) -> list[Snippet]:
    out: list[Snippet] = []
    for f in files:
        out += md_snippets(f) if f.suffix == ".md" else rst_snippets(f)
    return out


def python_source(snippet: Snippet) -> str:
    """The Python code of a snippet (a doctest's examples, without prompts and outputs)."""
    if snippet.kind == "doctest":
        return "".join(ex.source for ex in doctest.DocTestParser().get_examples(snippet.code))
    return snippet.code


def missing_packages(source: str) -> list[str]:
    """Top-level packages the snippet imports that are not installed here."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return sorted(r for r in roots if importlib.util.find_spec(r) is None)


def run(snippet: Snippet, timeout: float = 300.0) -> tuple[bool, str]:
    """Run one snippet in a fresh folder and interpreter; returns (passed, output)."""
    try:
        source = python_source(snippet)
        missing = missing_packages(source)
    except SyntaxError as exc:
        return False, f"not valid Python: {exc}"
    if missing and snippet.no_run is None:
        snippet.no_run = f"needs {', '.join(missing)}, not installed here"
    if snippet.no_run is not None:
        return True, f"compiled, not run: {snippet.no_run}"
    with tempfile.TemporaryDirectory(prefix="snippet_") as tmp:
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
        if snippet.kind == "doctest":
            (Path(tmp) / "snippet.txt").write_text(snippet.code, encoding="utf-8")
            cmd = [sys.executable, "-m", "doctest", "-o", "ELLIPSIS", "-o", "NORMALIZE_WHITESPACE", "snippet.txt"]
        else:
            (Path(tmp) / "snippet.py").write_text(snippet.code, encoding="utf-8")
            cmd = [sys.executable, "snippet.py"]
        try:
            res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s"
        return res.returncode == 0, (res.stdout + res.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="files to check (default: README.md and docs/)")
    p.add_argument("--list", action="store_true", help="list the snippets, run nothing")
    p.add_argument("--jobs", type=int, default=2, help="snippets run in parallel (default 2)")
    args = p.parse_args(argv)
    files = [f.resolve() for f in args.files] or default_files()
    snippets = collect(files)
    if args.list:
        for s in snippets:
            print(f"{s.where}: {s.kind}{f' (no-run: {s.no_run})' if s.no_run else ''}")
        return 0
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(run, snippets))
    failed = pending = 0
    for s, (ok, output) in zip(snippets, results):
        why = PENDING.get(s.path.relative_to(ROOT).as_posix())
        status = "ok" if ok else ("FAILED" if why is None else "PENDING")
        note = f" -- {output}" if ok and s.no_run else (f" -- known, not counted: {why}" if not ok and why else "")
        print(f"{status:6} {s.where} ({s.kind}){note}")
        if not ok:
            failed += why is None
            pending += why is not None
            print(textwrap.indent(output.rstrip(), "       | "))
    passed = len(snippets) - failed - pending
    print(
        f"snippets: {passed} passed, {failed} failed"
        + (f" ({pending} more fail on pages listed as pending)" if pending else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
