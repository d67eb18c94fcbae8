"""Base-weight fingerprints: which weight a delta was trained on, and whether a weight is that one.

A weight is identified by the SHA-256 of its values converted to float32 (little-endian,
C order), its top singular values and its dtype. The matching rule (docs/format.md):

1. the current weight's float32 hash equals the recorded one: a match. Moving a model to
   another device or a wider dtype (bf16/fp16 -> fp32 -> fp64) keeps the hash.
2. else, if the dtypes differ, the current weight cast to the recorded dtype is hashed:
   equal is a match (training saw exactly the rounded weight, e.g. fp16(W) of the fp32 W
   loaded now). Exact: a rotated or perturbed weight never passes.
3. else, if the current dtype cannot hold every value of the recorded one (the model was
   cast narrower, e.g. fp32 -> fp16, so the trained weight cannot be rebuilt), the recorded
   top singular values must match within 4 * eps(coarser dtype) * sigma_max. Only this case
   is approximate: a different weight with the same top singular values passes it.
4. otherwise: no match.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from svdtune import container
from svdtune.basis import Basis
from svdtune.errors import SvdtuneError

TOP_SIGMA = 4  # singular values kept in a fingerprint
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_NAMES = {str(d).removeprefix("torch."): d for d in FLOATS}
# dtype -> the dtypes all of whose values it holds exactly
HOLDS = {"float64": set(FLOAT_NAMES), "float32": {"float32", "float16", "bfloat16"},
         "float16": {"float16"}, "bfloat16": {"bfloat16"}}


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the base weight a delta was trained on.

    Attributes:
        sha256: hex SHA-256 of the weight converted to float32, little-endian, C order.
        top_sigma: its largest singular values (up to 4), descending.
        dtype: the weight's dtype when it was fingerprinted, e.g. "float32".
        basis: the training SVD's vectors where the result depends on them, one `Basis` per run
            of repeated singular values (ascending, disjoint); empty if there are none.
    """

    sha256: str
    top_sigma: tuple[float, ...]
    dtype: str
    basis: tuple[Basis, ...] = ()


def weight_sha256(weight: Tensor) -> str:
    """Hex SHA-256 of ``weight`` as float32 bytes (device- and upcast-independent)."""
    return hashlib.sha256(container.tensor_bytes(weight.detach().to(torch.float32))).hexdigest()


def fingerprint(weight: Tensor, sigma: Tensor) -> Fingerprint:
    """The Fingerprint of a base weight, given its (top) singular values."""
    top = tuple(float(s) for s in sigma[:TOP_SIGMA].to(torch.float32).tolist())
    return Fingerprint(weight_sha256(weight), top, str(weight.dtype).removeprefix("torch."))


def fingerprint_mismatch(expected: Fingerprint, weight: Tensor, top_sigma: Callable[[], Tensor]) -> str | None:
    """Why ``weight`` is not the base weight of ``expected``, or None if it is (the rule above).

    Args:
        expected: the recorded fingerprint.
        weight: the candidate base weight.
        top_sigma: a callable returning its descending singular values (called only in case 3).
    """
    digest = weight_sha256(weight)
    if digest == expected.sha256:
        return None
    now = str(weight.dtype).removeprefix("torch.")
    reason = f"its base weight differs from the one the delta was trained on (sha256 {digest[:12]} != {expected.sha256[:12]})"
    if now == expected.dtype or expected.dtype not in FLOAT_NAMES:
        return reason
    if weight_sha256(weight.detach().to(FLOAT_NAMES[expected.dtype])) == expected.sha256:
        return None
    if expected.dtype in HOLDS.get(now, set()) or not expected.top_sigma:
        return f"{reason}, also when cast to the {expected.dtype} it was trained in"
    sigma = top_sigma()[: len(expected.top_sigma)].to(torch.float64).cpu()
    recorded = torch.tensor(expected.top_sigma, dtype=torch.float64)
    eps = max(_eps(now), _eps(expected.dtype))
    if sigma.shape == recorded.shape and bool(((sigma - recorded).abs() <= 4 * eps * recorded[0]).all()):
        return None
    return f"{reason}, and its top singular values differ beyond {expected.dtype}->{now} rounding"


def check_base(name: str, expected: Fingerprint, weight: Tensor, top_sigma: Callable[[], Tensor], strict: bool,
               use: str, action: str) -> None:
    """Raise (strict) or warn if ``weight`` is not the base weight the layer's delta was trained on.

    Args:
        name: the layer, for the message.
        expected: the fingerprint recorded in the delta file.
        weight: the candidate base weight.
        top_sigma: a callable returning its descending singular values, called only when
            the hashes cannot decide (case 3 above): so a wrong base costs no SVD.
        strict: raise SvdtuneError; else warn and go on.
        use: what to do instead, e.g. "load the delta into the base model it was trained on".
        action: what strict=False goes on with, e.g. "loading".
    """
    reason = fingerprint_mismatch(expected, weight, top_sigma)
    if reason is None:
        return
    if strict:
        raise SvdtuneError(f"layer {name!r}: {reason}; {use}, or pass strict=False to go on anyway.")
    warnings.warn(f"layer {name!r}: {reason}; {action} anyway (strict=False).", UserWarning, stacklevel=4)


def _eps(dtype_name: str) -> float:
    return torch.finfo(FLOAT_NAMES.get(dtype_name, torch.float32)).eps
