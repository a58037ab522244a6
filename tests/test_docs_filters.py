"""The warning filters docs/warnings.md recommends, run for real.

A script triggers TC102 (a plain close with unread input) in a separate Python
process; each documented way of silencing it or making it fatal is applied, and the
result checked. The form the docs used to give, ``-W "ignore::tcpclose.X"``, is shown
not to work: CPython reads ``-W`` before it can import ``tcpclose`` ("invalid module
name"), so the docs must not recommend it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs" / "warnings.md"

TRIGGER = textwrap.dedent(
    """\
    import socket
    import tcpclose

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    client.sendall(b"a request the server never reads")
    tcpclose.close(conn, "default")  # unread input: RST, and TC102
    client.close()
    server.close()
    """
)


def _run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run as a user does: tcpclose installed (site-packages), no PYTHONPATH. (With
    PYTHONPATH naming the source tree, Python could import it while reading ``-W``.)"""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONPATH")}
    environment.update(env)
    return subprocess.run(
        argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    done = _run([sys.executable, "-c", "import tcpclose"], Path("/"))
    if done.returncode != 0:
        pytest.skip("tcpclose is not installed in this Python (pip install -e .)")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "server.py"
    path.write_text(TRIGGER)
    return path


def test_without_a_filter_tc102_is_shown(script: Path) -> None:
    done = _run([sys.executable, str(script)], script.parent)
    assert done.returncode == 0
    assert "DataLossWarning: TC102 " in done.stderr


def test_a_category_in_dash_w_does_not_work(script: Path) -> None:
    """The trap: CPython cannot import tcpclose while it parses ``-W``."""
    done = _run(
        [sys.executable, "-W", "ignore::tcpclose.DataLossWarning", str(script)], script.parent
    )
    assert "Invalid -W option ignored: invalid module name: 'tcpclose'" in done.stderr
    assert "TC102" in done.stderr  # not silenced
    commands = [line for line in DOCS.read_text(encoding="utf-8").splitlines() if "$ " in line]
    assert not [line for line in commands if "::tcpclose." in line]  # not shown as advice


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["-W", "ignore:TC102"], {}),
        (["-W", "ignore:TC1"], {}),
        ([], {"PYTHONWARNINGS": "ignore:TC102"}),
    ],
)
def test_a_message_filter_on_the_code_works(
    script: Path, argv: list[str], env: dict[str, str]
) -> None:
    done = _run([sys.executable, *argv, str(script)], script.parent, **env)
    assert done.returncode == 0
    assert done.stderr == ""


def test_a_message_filter_makes_it_fatal(script: Path) -> None:
    done = _run([sys.executable, "-W", "error:TC1", str(script)], script.parent)
    assert done.returncode == 1
    assert "tcpclose._warnings.DataLossWarning: TC102 " in done.stderr


@pytest.mark.parametrize(
    "code",
    [
        'warnings.filterwarnings("ignore", category=tcpclose.DataLossWarning)',
        'warnings.filterwarnings("ignore", message="TC102")',
    ],
)
def test_a_filter_in_code_works(script: Path, code: str) -> None:
    script.write_text(
        TRIGGER.replace("import tcpclose\n", f"import tcpclose\nimport warnings\n{code}\n")
    )
    done = _run([sys.executable, str(script)], script.parent)
    assert done.returncode == 0
    assert done.stderr == ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("filters", "passes"),
    [
        ('["error"]', False),
        ('["error", "ignore::tcpclose.DataLossWarning"]', True),
        ('["error", "ignore:TC102"]', True),
    ],
)
def test_pytest_filterwarnings_takes_the_category(
    tmp_path: Path, filters: str, passes: bool
) -> None:
    """pytest imports the category itself, so ``tcpclose.DataLossWarning`` works there."""
    (tmp_path / "pyproject.toml").write_text(
        f"[tool.pytest.ini_options]\nfilterwarnings = {filters}\n"
    )
    body = textwrap.indent(TRIGGER, "    ")
    (tmp_path / "test_close.py").write_text(f"def test_close():\n{body}")
    done = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_close.py"],
        tmp_path,
    )
    assert (done.returncode == 0) is passes, done.stdout + done.stderr
