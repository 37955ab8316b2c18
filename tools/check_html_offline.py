"""Check that the built HTML documentation loads nothing from the network.

Every ``<script src>``, stylesheet/preload/icon ``<link href>``, ``<img src>``,
``<iframe src>`` and CSS ``@import``/``url()`` in the built pages must be a
local file that exists; a page with math must load the bundled MathJax. Links
the reader clicks (``<a href>``) may point anywhere.

Usage::

    python tools/check_html_offline.py docs/_build/html   # exit 1 on any remote or missing resource
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOADED = {"script": ("src",), "img": ("src",), "iframe": ("src",), "source": ("src",), "link": ("href",)}
LINK_RELS_LOADED = {"stylesheet", "preload", "icon", "shortcut", "modulepreload", "prefetch", "manifest"}
CSS_URL = re.compile(r"""(?:@import\s+|url\()\s*['"]?([^'")\s]+)""")


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []  # (tag, url)
        self.math = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "link" and not (set((a.get("rel") or "").lower().split()) & LINK_RELS_LOADED):
            return
        for attr in LOADED.get(tag, ()):
            if a.get(attr):
                self.found.append((tag, a[attr]))
        if "math" in (a.get("class") or "").split():
            self.math = True


def is_remote(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme and parts.scheme not in ("file", "data")) or url.startswith("//")


def check(root: Path) -> list[str]:
    """Problems found under ``root`` (empty when every page works offline)."""
    problems: list[str] = []
    pages = sorted(root.rglob("*.html"))
    if not pages:
        return [f"{root}: no HTML pages (build the docs first)"]
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        urls = parser.found
        for tag, url in urls:
            if is_remote(url):
                problems.append(f"{page.relative_to(root)}: <{tag}> loads {url} from the network")
            elif not url.startswith("data:"):
                target = (page.parent / unquote(urlsplit(url).path)).resolve()
                if not target.exists():
                    problems.append(f"{page.relative_to(root)}: <{tag}> loads {url}, which is not in the build")
        if parser.math and not any(
            tag == "script" and "mathjax" in url.lower() and not is_remote(url) for tag, url in urls
        ):
            problems.append(f"{page.relative_to(root)}: has math but loads no local MathJax")
    for css in sorted(root.rglob("*.css")):
        for url in CSS_URL.findall(css.read_text(encoding="utf-8", errors="replace")):
            if is_remote(url):
                problems.append(f"{css.relative_to(root)}: loads {url} from the network")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else "docs/_build/html")
    problems = check(root)
    for p in problems:
        print(p)
    n = len(list(root.rglob("*.html")))
    print(f"{n} pages checked: {'no remote or missing resource' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
