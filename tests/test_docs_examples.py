"""The documentation's code runs: examples under docs/examples/, and >>> blocks in pages.

* Each ``docs/examples/*.py`` runs in a subprocess with this interpreter (the venv's), with
  warnings as errors, and must exit 0 within its time budget. Examples are small,
  self-contained, loopback-only programs; each is linked from at least one page.
* Each fenced ``pycon`` block in ``docs/*.md`` is run as a doctest, the blocks of one page
  sharing their names in order, so the outputs printed in the docs are the real ones.
  Plain ``python`` blocks are not run: use them for code that needs a live peer or an
  API that has not landed yet. ``warnings.md`` is maintained with the audit code and
  is not collected here.
* The docs' generators (diagrams, benchmark tables) run on the current code and data.
"""

from __future__ import annotations

import doctest
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name not in {"warnings.md"})

#: Each example is meant to finish in under 2 s; the hard limit leaves room for a busy CI.
EXAMPLE_BUDGET_S = 2.0
EXAMPLE_TIMEOUT_S = 20.0

_PYCON_BLOCK = re.compile(r"^```pycon[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- examples ---------------------------------------------------------------------------------


def test_examples_exist() -> None:
    assert EXAMPLES, "no docs/examples/*.py found"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-W", "error", str(example)],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        cwd=ROOT,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (
        f"{example.name} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    assert result.stdout.strip(), f"{example.name} printed nothing"
    assert elapsed < EXAMPLE_BUDGET_S * 3, f"{example.name} took {elapsed:.2f} s"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_linked_from_a_page(example: Path) -> None:
    link = f"examples/{example.name}"
    pages = [page.name for page in DOCS.glob("*.md") if link in page.read_text("utf-8")]
    assert pages, f"no page in docs/ links to {link}"


# -- >>> blocks in the pages ---------------------------------------------------------------------


class _Checker(doctest.OutputChecker):
    """Compare exceptions by their unqualified name: the docs show ``PolicyError: ...``
    where the traceback says ``tcpclose._errors.PolicyError: ...``."""

    _QUALIFIED = re.compile(r"^(?:\w+\.)+(\w+(?:Error|Exception|Warning)):", re.MULTILINE)

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        got = self._QUALIFIED.sub(r"\1:", got)
        return super().check_output(want, got, optionflags)


def _page_doctest(page: Path) -> doctest.DocTest | None:
    """One doctest per page: its pycon blocks in order, line numbers as in the page."""
    source = page.read_text("utf-8")
    parser = doctest.DocTestParser()
    examples: list[doctest.Example] = []
    for match in _PYCON_BLOCK.finditer(source):
        first_line = source.count("\n", 0, match.start(1))
        for example in parser.get_examples(match.group(1), page.name):
            example.lineno += first_line
            examples.append(example)
    if not examples:
        return None
    return doctest.DocTest(examples, {"__name__": "__docs__"}, page.name, str(page), 0, source)


PAGES_WITH_CODE = [page for page in PAGES if _page_doctest(page) is not None]


def test_some_pages_have_runnable_blocks() -> None:
    assert any(page.name == "configuration.md" for page in PAGES_WITH_CODE)


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_page_blocks_run(page: Path) -> None:
    test = _page_doctest(page)
    assert test is not None
    runner = doctest.DocTestRunner(
        checker=_Checker(),
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
    )
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.tries > 0
    assert runner.failures == 0, "".join(report)


# -- generators ----------------------------------------------------------------------------------


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz's dot draws the close plan (apt-get install graphviz)",
)


def test_diagrams_render_as_svg() -> None:
    diagrams = _load("gen_state_diagram")
    rendered: dict[str, str] = diagrams.render_all()
    assert {"tcp_close_states.svg", "tcp_close_sequence.svg"} <= set(rendered)
    if shutil.which("dot") is not None:
        assert "close_plan.svg" in rendered, "the close plan diagram needs tcpclose._plan"
    for name, svg in rendered.items():
        root = ElementTree.fromstring(svg.encode("utf-8"))
        assert root.tag == "{http://www.w3.org/2000/svg}svg", name
        assert diagrams.render_all()[name] == svg, f"{name} is not deterministic"


@needs_dot
def test_close_plan_diagram_shows_every_phase_and_event() -> None:
    from tcpclose import _plan

    svg = html.unescape(_load("gen_state_diagram").render_all()["close_plan.svg"])
    for phase in _plan.Phase:
        assert f">{phase.value}</text>" in svg, phase
    for event in {event for _phase, event in _plan.TRANSITIONS}:
        assert f"{event.value}</text>" in svg or f"{event.value} " in svg, event


def test_the_committed_close_plan_shows_every_phase() -> None:
    """Without dot the committed picture is shown (the layout may differ between
    Graphviz versions, so only what it names is compared)."""
    from tcpclose import _plan

    committed = html.unescape((DOCS / "img" / "close_plan.svg").read_text(encoding="utf-8"))
    for phase in _plan.Phase:
        assert f">{phase.value}</text>" in committed, phase


def test_benchmark_tables_without_results(tmp_path: Path) -> None:
    benchmarks = _load("gen_benchmarks")
    text, plots = benchmarks.render(benchmarks.read_results(tmp_path / "missing"))
    assert "No results yet" in text
    assert plots == {}


def test_benchmark_tables_from_json(tmp_path: Path) -> None:
    benchmarks = _load("gen_benchmarks")
    results = tmp_path / "results"
    results.mkdir()
    (results / "lookup.json").write_text(
        json.dumps(
            {
                "benchmark": "lookup latency",
                "kernel": "6.18",
                "runs": [
                    {"method": "lookup", "time_wait": 50_000, "median_us": 5.2},
                    {"method": "procfs", "time_wait": 50_000, "median_us": 710.0},
                ],
            }
        ),
        encoding="utf-8",
    )
    (results / "broken.json").write_text("{not json", encoding="utf-8")
    text, plots = benchmarks.render(benchmarks.read_results(results))
    assert "### lookup latency" in text
    assert "| method | time_wait | median_us |" in text
    assert "| procfs | 50,000 | 710 |" in text
    assert "Unreadable results file" in text
    if importlib.util.find_spec("matplotlib") is None:
        assert plots == {}  # the docs extra draws them; the tables do not need it
        return
    assert list(plots) == ["bench_lookup_1.svg"]
    ElementTree.fromstring(plots["bench_lookup_1.svg"].encode("utf-8"))


def test_benchmark_tables_keep_raw_samples_out(tmp_path: Path) -> None:
    """A results table shows medians; the raw samples of each round stay in the JSON."""
    benchmarks = _load("gen_benchmarks")
    results = tmp_path / "results"
    results.mkdir()
    samples = [{"connections_per_s": 1000.0 + i} for i in range(7)]
    (results / "aio.json").write_text(
        json.dumps(
            {
                "by_loop": {
                    "asyncio": {
                        "benchmark": "aio short connections",
                        "machine": {"cpus": 2, "kernel": "6.18"},
                        "python": "3.11.7",
                        "runs": [
                            {"name": "plain asyncio", "ratio_to_plain": 1.0, "samples": samples},
                            {"name": "graceful", "ratio_to_plain": 0.8, "samples": samples},
                        ],
                    }
                }
            }
        ),
        encoding="utf-8",
    )
    text, plots = benchmarks.render(benchmarks.read_results(results))
    assert "samples |" not in text  # no column of raw samples
    assert "| name | ratio_to_plain |" in text
    assert "Raw samples of each round are in the JSON file." in text
    assert "measured on Linux 6.18, 2 CPUs, Python 3.11.7" in text
    assert "by_loop.asyncio.runs" not in text  # a title in words, not a JSON path
    if importlib.util.find_spec("matplotlib") is not None:
        (svg,) = plots.values()
        assert "aio short connections" in svg or "<path" in svg


def test_reports_page_lists_every_outcome() -> None:
    from tcpclose._plan import Outcome

    page = (DOCS / "reports.md").read_text("utf-8")
    missing = [o.value for o in Outcome if f"| `{o.value}` |" not in page]
    assert not missing, f"docs/reports.md does not describe outcomes {missing}"


def test_reports_page_lists_every_report_field() -> None:
    import dataclasses

    from tcpclose import CloseReport

    page = (DOCS / "reports.md").read_text("utf-8")
    fields = [field.name for field in dataclasses.fields(CloseReport)]
    missing = [name for name in fields if f"`{name}`" not in page]
    assert not missing, f"docs/reports.md does not describe CloseReport fields {missing}"
