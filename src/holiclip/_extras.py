"""Optional dependencies: one place that imports them and names the extra to install when missing."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package is not installed; the message is one line naming the extra to install."""

    def __init__(self, module: str, extra: str, what: str):
        super().__init__(f"{what} needs {module.split('.')[0]}: pip install 'holiclip[{extra}]'", name=module)
        self.module, self.extra, self.what = module, extra, what


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module`` or raise :class:`MissingExtra` (``what`` says which command or feature needs it).

    Any ImportError while importing it counts (a dependency of the package missing too, e.g. the
    ``requests`` clip-benchmark imports undeclared): installing the extra is the fix either way.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(module, extra, what) from None
