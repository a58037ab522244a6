"""The launcher's hook for gunicorn: its ``sync`` and ``gthread`` workers become
:mod:`tcpclose.gunicorn`'s, with no change to the command line.

gunicorn resolves its worker class in one place, ``gunicorn.util.load_class`` (for
``-k sync``, ``-k gthread``, full class paths, and the switch to ``gthread`` that
``--threads`` makes). When ``gunicorn.util`` is imported, the hook wraps that function
so that gunicorn's own ``SyncWorker`` and ``ThreadWorker``, exactly those classes,
come back as :class:`tcpclose.gunicorn.SyncWorker` and :class:`~tcpclose.gunicorn.ThreadWorker`.
Other worker classes, subclasses included, are left alone. gunicorn is not imported
by the hook: a process that never imports it is not touched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Final

__all__ = ("GunicornHook", "install_gunicorn_hook")

#: The module whose function is wrapped, and the function.
TARGET_MODULE: Final = "gunicorn.util"
TARGET_FUNCTION: Final = "load_class"
#: gunicorn's worker classes and ours, by qualified name.
REPLACEMENTS: Final = {
    ("gunicorn.workers.sync", "SyncWorker"): "SyncWorker",
    ("gunicorn.workers.gthread", "ThreadWorker"): "ThreadWorker",
}
_WRAPPED: Final = "__tcpclose_wrapped__"

_lock: Final = threading.Lock()


class GunicornHook(importlib.abc.MetaPathFinder):
    """A finder on ``sys.meta_path`` that patches ``gunicorn.util`` once it is loaded
    (or at once, when it is loaded already). :meth:`uninstall` undoes both."""

    def __init__(self) -> None:
        self.installed = False

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET_MODULE or not self.installed:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec

    def install(self) -> None:
        with _lock:
            if self.installed:
                return
            self.installed = True
            sys.meta_path.insert(0, self)
            module = sys.modules.get(TARGET_MODULE)
            if module is not None:
                _patch(module)

    def uninstall(self) -> None:
        """Take the finder off ``sys.meta_path`` and put ``load_class`` back.
        Idempotent."""
        with _lock:
            if not self.installed:
                return
            self.installed = False
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            module = sys.modules.get(TARGET_MODULE)
            if module is not None:
                _unpatch(module)


class _PatchingLoader(importlib.abc.Loader):
    """Loads the module with the real loader, then patches it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...
        return getattr(self._loader, name)


def _patch(module: ModuleType) -> None:
    original: Callable[..., Any] = getattr(module, TARGET_FUNCTION)
    if hasattr(original, _WRAPPED):
        return

    def load_class(uri: Any, *args: Any, **kwargs: Any) -> Any:
        return replacement_for(original(uri, *args, **kwargs))

    load_class.__doc__ = original.__doc__
    setattr(load_class, _WRAPPED, original)
    setattr(module, TARGET_FUNCTION, load_class)


def _unpatch(module: ModuleType) -> None:
    current = getattr(module, TARGET_FUNCTION, None)
    original = getattr(current, _WRAPPED, None)
    if original is not None:
        setattr(module, TARGET_FUNCTION, original)


def replacement_for(cls: Any) -> Any:
    """tcpclose's worker class for gunicorn's own ``SyncWorker`` or ``ThreadWorker``;
    any other class unchanged."""
    name = REPLACEMENTS.get((getattr(cls, "__module__", ""), getattr(cls, "__qualname__", "")))
    if name is None:
        return cls
    from . import _gunicorn

    replacement: Any = getattr(_gunicorn, name)
    return replacement


def install_gunicorn_hook() -> GunicornHook:
    """Install the hook (see the module docstring); returns it, for ``uninstall()``."""
    hook = GunicornHook()
    hook.install()
    return hook
