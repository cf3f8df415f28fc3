"""Make ``import open_clip`` work when torchvision's C++ extension cannot load.

Why this exists (the one place it is explained): PyPI's Linux torchvision wheels are built
against the CUDA build of torch. Beside a CPU-only torch wheel (our default on CPU boxes,
``torch==2.13.0``), torchvision's ``_C.so`` fails to load, and torchvision >= 0.2x then dies
at import with ``RuntimeError: operator torchvision::nms does not exist`` because its
``_meta_registrations`` module registers fake kernels for ``nms``/``qnms`` unconditionally.
open_clip imports torchvision (for transforms only), so open_clip fails too.

Fix: before torchvision is imported, try to load its extension exactly as torchvision would.
If that works (every normal GPU install, or a matched CPU build) we do nothing at all.
Only if it fails do we declare the two operator *schemas* that the meta registrations need.
The operators get no kernels: torchvision's detection ops stay unavailable (holiclip never
uses them) and calling one raises a clear "no kernel" error instead of breaking the import.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LIB = None  # keeps the torch.library handle alive for the life of the process


class _BeforeTorchvision:
    """Import hook that runs the shim just before torchvision is first imported, so that
    ``import holiclip`` needs no torch and still makes a later ``import open_clip`` work."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            ensure_torchvision_importable()
        return None  # the normal finders import it


_HOOK = _BeforeTorchvision()


def install_import_hook() -> None:
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def ensure_torchvision_importable() -> bool:
    """Returns True when the shim had to act."""
    global _LIB
    if _HOOK in sys.meta_path:  # once is enough; also keeps find_spec below from re-entering
        sys.meta_path.remove(_HOOK)
    if "torchvision" in sys.modules or _LIB is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import torch

    candidates = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    for so in candidates:
        try:
            torch.ops.load_library(str(so))
            return False
        except (OSError, ImportError, RuntimeError):
            pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True

