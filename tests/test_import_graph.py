"""The package's import graph has no cycle and no arrow running back up (issue 21).

Every ``import``/``from ... import`` of a tcpclose module is an arrow, wherever it stands:
at the top of a module, inside a function (a deferred import is still a dependency) or
under ``TYPE_CHECKING``. Each module sits in one layer of :data:`LAYERS`, lowest first;
a module may import its own layer or lower ones, never a higher one. A new module must
be placed in a layer here: the test names it otherwise.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tcpclose"

#: Lowest first. What each layer is, and so where a new module goes.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "leaves: errors, units, warning classes, kernel value types",
        frozenset(
            {
                "_errors",
                "_units",
                "_version",
                "_warnings",
                "_kernel._types",
                "_kernel._address",
            }
        ),
    ),
    (
        "kernel view: decoders, backends, counts",
        frozenset(
            {
                "_kernel",
                "_kernel._tcpinfo",
                "_kernel._summary",
                "_kernel._diag",
                "_kernel._netlink",
                "_kernel._procfs",
                "_kernel._proctext",
                "_kernel._sockopt",
                "_kernel._unsupported",
            }
        ),
    ),
    (
        "pure values: policy, findings catalogue, facts",
        frozenset({"_policy", "_findings", "_facts"}),
    ),
    ("pure logic: the close plan, the warning rules", frozenset({"_plan", "_checks"})),
    ("host facts (I/O): audit, host view", frozenset({"_audit", "_hostview"})),
    ("reports", frozenset({"_report"})),
    ("what a driver measures around a close", frozenset({"_observe", "_linger"})),
    ("asyncio driver: what it knows of transports (TLS, uvloop)", frozenset({"_aio_transport"})),
    ("asyncio driver: the closer", frozenset({"_aio_closer"})),
    ("asyncio driver: the wrapper protocol and proxy transport", frozenset({"_aio_proxy"})),
    ("drivers", frozenset({"_sync", "_aio", "_background"})),
    (
        "sinks and views of reports",
        frozenset({"_logsink", "_metrics", "_metrics_otel", "_metrics_prometheus", "_states"}),
    ),
    ("settings from the environment", frozenset({"_environment"})),
    (
        "adoption: servers, the launcher, gunicorn's workers",
        frozenset(
            {
                "_aio_server",
                "_loop_adapter",
                "_socketserver",
                "_gunicorn",
                "_gunicorn_hook",
                "_launcher",
                "_bootstrap.sitecustomize",
            }
        ),
    ),
    (
        "public modules of the core",
        frozenset({"", "aio", "kernel", "metrics", "socketserver", "gunicorn"}),
    ),
    (
        "server integrations over the public asyncio API",
        frozenset({"_protocol_class", "_aiohttp", "_sanic", "_uvicorn", "_websockets"}),
    ),
    (
        "public modules of the integrations",
        frozenset({"aiohttp", "sanic", "uvicorn", "websockets"}),
    ),
    ("command line and demo", frozenset({"_demo_client", "_demo", "_cli", "__main__"})),
)


def _name(path: Path) -> str:
    """``tcpclose/_kernel/_diag.py`` -> ``"_kernel._diag"``; the package itself is ``""``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """The tcpclose modules ``name`` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                base_name = ".".join([*base, *([node.module] if node.module else [])])
                absolute = "tcpclose" + ("." + base_name if base_name else "")
            else:
                absolute = node.module or ""
            # ``from . import _checks`` imports the module ``_checks``; names that are
            # not modules are attributes of ``absolute``.
            submodules = [f"{absolute}.{a.name}" for a in node.names]
            targets = [t for t in submodules if _relative(t) in MODULES] or [absolute]
        for target in targets:
            if target == "tcpclose" or target.startswith("tcpclose."):
                module = _relative(target)
                if module != name:
                    yield module, node.lineno


def _relative(absolute: str) -> str:
    return absolute.removeprefix("tcpclose").removeprefix(".")


GRAPH = {name: dict(_imports(name, path)) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"tcpclose.{name} is in no layer of tests/test_import_graph.py")


def test_every_module_has_one_layer() -> None:
    placed = [m for _, members in LAYERS for m in members]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert sorted(set(placed) - set(MODULES)) == [], "a layer names a module that is gone"
    assert sorted(set(MODULES) - set(placed)) == [], "place the new module in a layer"


def test_no_arrow_runs_back_up() -> None:
    upward = [
        f"tcpclose.{a} ({LAYERS[_layer(a)][0]}) line {line} imports "
        f"tcpclose.{b} ({LAYERS[_layer(b)][0]})"
        for a, targets in GRAPH.items()
        for b, line in targets.items()
        if b in MODULES and _layer(b) > _layer(a)
    ]
    assert upward == []


def test_no_cycle() -> None:
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for target in GRAPH.get(node, {}):
            visit(target, [*path, node])
        done.add(node)

    for name in GRAPH:
        visit(name, [])
    assert cycles == []


def test_the_walk_sees_deferred_and_type_checking_imports() -> None:
    """The graph is what the test claims: a function's own import and a TYPE_CHECKING
    import both count (the circle issue 21 found was one of each)."""
    assert "_audit" in GRAPH["_report"]  # inside build_report
    assert "_report" in GRAPH["_logsink"]  # under TYPE_CHECKING
    assert "_checks" in GRAPH["_sync"]  # ``from . import _checks``
    assert "_errors" in GRAPH["_kernel._tcpinfo"]  # absolute ``from tcpclose._errors``
