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
    "sphinx-mathjax-offline",  # a copy of MathJax 3 served from _static: math renders offline
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
html_css_files = ["srn/wide.css"]  # wide tables and long code lines scroll inside the page
# Docstring examples (pulled in by autodoc) use the names of their own module, as
# pytest --doctest-modules runs them; give the doctest builder the same names.
# The pages' own snippets import what they use (tools/run_snippets.py runs each
# one alone, with nothing injected).
doctest_global_setup = """
import os, tempfile
os.chdir(tempfile.mkdtemp(prefix="gradwatch_doctest_"))  # files the examples write land there, not in the repo
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
# No page loads anything from the network: MathJax comes from the sphinx-mathjax-offline package
# (checked after each build by tools/check_html_offline.py).
nitpicky = False
suppress_warnings = ["myst.header"]
