"""svdtune: spectral fine-tuning for PyTorch.

Each selected Linear/Conv weight is decomposed once, W = U diag(sigma) V^T, and
only one number per singular value is trained (a spectral shift, SVDiff).
"""

from svdtune.basis import Basis
from svdtune.delta import DeltaFile, Fingerprint, LayerDelta, read_delta
from svdtune.errors import SvdtuneError
from svdtune.io import load_delta, save_delta
from svdtune.lora import LoraExport, export_lora
from svdtune.offline import combine, merge_files
from svdtune.report import Report
from svdtune.model import (
    apply,
    merge,
    report,
    restore,
    set_scale,
    singular_values,
    trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "Basis",
    "DeltaFile",
    "Fingerprint",
    "LayerDelta",
    "LoraExport",
    "Report",
    "SvdtuneError",
    "apply",
    "combine",
    "export_lora",
    "load_delta",
    "merge",
    "merge_files",
    "read_delta",
    "report",
    "restore",
    "save_delta",
    "set_scale",
    "singular_values",
    "trainable_parameters",
]
