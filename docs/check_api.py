"""Fail if a public name has no docstring or is missing from the API reference."""

import re
import sys
from pathlib import Path

import gradwatch

api = (Path(__file__).parent / "api.rst").read_text()
listed = set(re.findall(r"^   ([A-Za-z_][A-Za-z0-9_]*)$", api, flags=re.M))
problems = []
for name in gradwatch.__all__:
    if name.startswith("__"):
        continue
    obj = getattr(gradwatch, name)
    if not (getattr(obj, "__doc__", None) or "").strip():
        problems.append(f"{name}: no docstring")
    if name not in listed:
        problems.append(f"{name}: missing from docs/api.rst")
for name in sorted(listed - set(gradwatch.__all__)):
    problems.append(f"{name}: in docs/api.rst but not in gradwatch.__all__")
if problems:
    print("API reference check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"API reference check: {len(gradwatch.__all__) - 1} public names documented")
