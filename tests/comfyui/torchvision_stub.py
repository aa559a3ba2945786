"""For probes that import ComfyUI in a subprocess: empty `torchvision` modules when the venv's torchvision
cannot load beside its torch (ComfyUI imports it at module level in models the Flux tests never run)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Stub(types.ModuleType):
    def __getattr__(self, attr: str) -> types.ModuleType:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision.*` as empty modules: ComfyUI imports it at module level in unrelated models."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def torchvision_or_stub() -> None:
    """A venv whose torchvision does not match its torch cannot import ComfyUI; Flux never uses torchvision."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
