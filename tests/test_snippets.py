"""tools/run_snippets.py finds every Python snippet and runs each alone; tools/check_html_offline.py
flags remote resources. (CI runs the snippets of the real README and docs with the script itself.)"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_html_offline  # noqa: E402
import run_snippets  # noqa: E402

RST = """Title
=====

.. doctest::

   >>> x = 1 + 1
   >>> x
   2

A literal block::

   print("literal")

.. code-block:: python
   :caption: with an option

   print(undefined_name)

.. code-block:: bash

   echo not python

.. snippet: no-run needs a server

.. code-block:: python

   import server_client
"""

MD = """# Title

```python
print("fenced")
```

```bash
echo not python
```

<!-- snippet: no-run talks to a service -->
```python
connect()
```
"""


@pytest.fixture
def pages(tmp_path, monkeypatch):
    monkeypatch.setattr(run_snippets, "ROOT", tmp_path)
    (tmp_path / "page.rst").write_text(RST)
    (tmp_path / "README.md").write_text(MD)
    return tmp_path


def test_finds_python_blocks_only_with_kinds_lines_and_markers(pages):
    rst = run_snippets.rst_snippets(pages / "page.rst")
    assert [(s.kind, s.line, s.no_run) for s in rst] == [
        ("doctest", 6, None),
        ("script", 12, None),
        ("script", 17, None),
        ("script", 27, "needs a server"),
    ]
    assert rst[0].code == ">>> x = 1 + 1\n>>> x\n2\n"
    md = run_snippets.md_snippets(pages / "README.md")
    assert [(s.code, s.no_run) for s in md] == [('print("fenced")\n', None), ("connect()\n", "talks to a service")]


def test_each_snippet_runs_alone_with_nothing_injected(pages):
    doc, literal, undefined, marked = run_snippets.rst_snippets(pages / "page.rst")
    assert run_snippets.run(doc)[0]
    ok, out = run_snippets.run(literal)
    assert ok and "literal" in out
    ok, out = run_snippets.run(undefined)  # a forgotten import fails here as it would for a reader
    assert not ok and "NameError" in out
    ok, out = run_snippets.run(marked)
    assert ok and "not run: needs a server" in out


def test_a_wrong_doctest_output_fails(pages):
    snippet = run_snippets.Snippet(pages / "page.rst", 1, "doctest", ">>> 1 + 1\n3\n")
    ok, out = run_snippets.run(snippet)
    assert not ok and "Expected" in out


def test_snippets_importing_a_package_not_installed_are_compiled_not_run(pages):
    snippet = run_snippets.Snippet(pages / "page.rst", 1, "script", "import no_such_package_here\nprint(1)\n")
    ok, out = run_snippets.run(snippet)
    assert ok and "needs no_such_package_here" in out
    broken = run_snippets.Snippet(pages / "page.rst", 1, "script", "import no_such_package_here\nprint(\n")
    assert not run_snippets.run(broken)[0]  # still compiled


def test_main_exits_non_zero_when_a_snippet_fails(pages, capsys):
    assert run_snippets.main([str(pages / "README.md")]) == 0
    assert run_snippets.main([str(pages / "page.rst")]) == 1
    assert "snippets: 3 passed, 1 failed" in capsys.readouterr().out


def test_failures_on_pending_pages_are_shown_but_not_counted(pages, capsys, monkeypatch):
    monkeypatch.setattr(run_snippets, "PENDING", {"page.rst": "being rewritten"})
    assert run_snippets.main([str(pages / "page.rst")]) == 0
    out = capsys.readouterr().out
    assert "PENDING page.rst:17" in out and "known, not counted: being rewritten" in out and "NameError" in out


def test_offline_check_flags_remote_scripts_and_missing_files(tmp_path):
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "mathjax.js").write_text("")
    (tmp_path / "ok.html").write_text(
        '<script src="_static/mathjax.js"></script><span class="math">x</span><a href="https://example.org">x</a>'
    )
    assert check_html_offline.check(tmp_path) == []
    (tmp_path / "bad.html").write_text(
        '<script src="https://cdn.example.org/mathjax.js"></script>'
        '<link rel="stylesheet" href="_static/missing.css"><span class="math">x</span>'
    )
    problems = check_html_offline.check(tmp_path)
    assert any("cdn.example.org" in p and "network" in p for p in problems)
    assert any("missing.css" in p and "not in the build" in p for p in problems)
    assert "bad.html: has math but loads no local MathJax" in problems
    (tmp_path / "bare.html").write_text('<span class="math">x</span>')
    assert any("bare.html: has math but loads no local MathJax" in p for p in check_html_offline.check(tmp_path))
