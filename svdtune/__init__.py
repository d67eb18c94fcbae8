"""svdtune: spectral fine-tuning for PyTorch.

Each selected Linear/Conv weight is decomposed once, W = U diag(sigma) V^T, and
only one number per singular value is trained (a spectral shift, SVDiff).

The public names are imported on first use (PEP 562), so that ``import svdtune``,
``svdtune --help`` and ``svdtune --version`` do not pay for importing torch.
"""

import importlib
import importlib.util
import sys
import types

from svdtune._version import __version__

# Public name -> the module that defines it. Add new public names here; they form __all__.
_EXPORTS = {
    "Basis": "svdtune.basis",
    "DeltaFile": "svdtune.delta",
    "Fingerprint": "svdtune.delta",
    "LayerDelta": "svdtune.delta",
    "read_delta": "svdtune.delta",
    "SvdtuneError": "svdtune.errors",
    "load_delta": "svdtune.io",
    "save_delta": "svdtune.io",
    "combine": "svdtune.offline",
    "merge_files": "svdtune.offline",
    "RandomizedSVD": "svdtune.randomized",
    "LoraExport": "svdtune.lora",
    "export_lora": "svdtune.lora",
    "Report": "svdtune.report",
    "apply": "svdtune.adapting",
    "merge": "svdtune.model",
    "report": "svdtune.model",
    "restore": "svdtune.model",
    "set_memory": "svdtune.memory",
    "set_scale": "svdtune.model",
    "singular_values": "svdtune.model",
    "trainable_parameters": "svdtune.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = globals()[name] = getattr(importlib.import_module(_EXPORTS[name]), name)
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # svdtune.container, as the eager import gave
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule svdtune.report must not hide the public function svdtune.report.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
