"""mkdocs hooks (``hooks:`` in mkdocs.yml): keep generated docs content current.

Before each build, redraw the diagrams from their tables (``gen_state_diagram.py``,
including the close plan from ``tcpclose._plan``) and re-render the benchmark tables
from ``benchmarks/results/*.json`` (``gen_benchmarks.py``). Files are written only when
their content changes, so ``mkdocs serve`` does not loop and a clean tree stays clean.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

DOCS = Path(__file__).resolve().parent
log = logging.getLogger("mkdocs.hooks.tcpclose")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tcpclose_docs_{name}", DOCS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def on_pre_build(config: Any, **kwargs: Any) -> None:
    diagrams = _load("gen_state_diagram")
    for path in diagrams.write_all():
        log.info("regenerated %s", path.relative_to(DOCS.parent))
    if diagrams.close_plan() is None:
        # The page would show a committed picture the code may no longer back.
        log.warning("close plan diagram not regenerated: needs tcpclose._plan and Graphviz's dot")
    benchmarks = _load("gen_benchmarks")
    for path in benchmarks.write():
        log.info("regenerated %s", path.relative_to(DOCS.parent))


# Docstrings in the package are written for both Sphinx-style readers and mkdocstrings.
# In the API pages, show reStructuredText roles (:class:`X`, :meth:`X`) as plain code,
# and a paragraph that introduces a literal block ("Example::") with a single colon.
_RST_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj|const):(<code>)")
_RST_LITERAL_INTRO = re.compile(r"(\w)::</p>")


def on_page_content(html: str, **kwargs: Any) -> str:
    html = _RST_ROLE.sub(r"\1", html)
    return _RST_LITERAL_INTRO.sub(r"\1:</p>", html)
