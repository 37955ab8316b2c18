"""Sphinx configuration of the gradwatch documentation (builds offline)."""

from importlib.metadata import version as _version

project = "gradwatch"
author = "the gradwatch developers"
copyright = "2026, the gradwatch developers"
release = _version("gradwatch")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
html_theme = "furo"
html_title = f"gradwatch {release}"
html_static_path = ["_static"]
# Docstring examples use the names of their own module (pytest runs them that
# way too, with --doctest-modules); give the doctest builder the same names.
doctest_global_setup = """
import math
import matplotlib
matplotlib.use("Agg")
import numpy as np
import torch
import gradwatch as gw
from gradwatch import *
from gradwatch.clip import *
from gradwatch.detect import *
from gradwatch.norms import *
from gradwatch.plot import *
from gradwatch.sinks import *
"""
# MathJax is loaded from a CDN by the browser when a page is read, never at build time.
nitpicky = False
suppress_warnings = ["myst.header"]
