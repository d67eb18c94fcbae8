"""svdtune: spectral fine-tuning for PyTorch.

Each selected Linear/Conv weight is decomposed once, W = U diag(sigma) V^T, and
only one number per singular value is trained (a spectral shift, SVDiff).
"""

from svdtune.errors import SvdtuneError
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
    "Report",
    "SvdtuneError",
    "apply",
    "merge",
    "report",
    "restore",
    "set_scale",
    "singular_values",
    "trainable_parameters",
]
