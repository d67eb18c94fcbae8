"""On-disk cache of decompositions: ``apply(..., cache_dir=PATH)`` computes each SVD once.

An entry is one safetensors file ``<key>.safetensors`` in the cache folder,
holding tensors ``U`` (m, k), ``sigma`` (k,) and ``Vh`` (k, n) and svdtune's
checksum (see `svdtune.container`). The key is the SHA-256 of everything the
result depends on: the weight's bytes, shape and dtype, the rank, and the
algorithm (svdtune's cache version, the torch version, the device type and the
LAPACK driver). So a changed weight, rank or library never reuses a stale entry.

Entries are written atomically (temporary file + rename): several processes may
fill the same folder at once; at worst two compute the same entry and the last
rename wins with identical content. A damaged entry (detected by its checksum), or one
that is not a regular file (a FIFO would block, a device read without end), is
recomputed and replaced, with a warning. A folder that cannot be written only
costs the caching (a warning), never the decomposition.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings

import torch
from torch import Tensor

from svdtune import container
from svdtune.decompose import Decomposition, decompose, svd_driver, svd_dtype, weight_matrix
from svdtune.errors import SvdtuneError

CACHE_VERSION = "2"  # bump when decompose() changes what it returns for the same input (2: next_sigma)
FORMAT = "svdtune.svd-cache"


def algorithm(weight: Tensor) -> str:
    """What, besides the weight and rank, decides the decomposition of ``weight``."""
    driver = svd_driver(weight.device) or "default"
    return f"svdtune-cache-{CACHE_VERSION};torch-{torch.__version__};{weight.device.type};{driver};signfix-maxabs"


def cache_key(weight: Tensor, rank: int | None) -> str:
    """The hex SHA-256 naming the cache entry of (weight, rank) under the current algorithm."""
    digest = hashlib.sha256()
    description = f"{tuple(weight.shape)};{weight.dtype};rank={rank};{algorithm(weight)}"
    digest.update(description.encode("utf-8") + b"\0")
    digest.update(container.tensor_bytes(weight))
    return digest.hexdigest()


def decompose_cached(weight: Tensor, rank: int | None, cache_dir: str | os.PathLike | None) -> Decomposition:
    """`decompose`, reusing the stored result from ``cache_dir`` when there is one.

    Args:
        weight: a Linear/Conv weight; it is not modified.
        rank: as for `decompose`.
        cache_dir: the cache folder (created if missing); None computes without caching.

    Returns:
        The Decomposition, equal to ``decompose(weight, rank)`` on this device and library.

    Raises:
        SvdtuneError: as `decompose` (a non-finite weight).

    Example:
        >>> factors = decompose_cached(layer.weight, rank=None, cache_dir="~/.cache/svdtune")
    """
    if cache_dir is None:
        return decompose(weight, rank)
    folder = os.path.expanduser(os.fspath(cache_dir))
    key = cache_key(weight.detach(), rank)
    path = os.path.join(folder, f"{key}.safetensors")
    if os.path.exists(path):
        factors = _read_entry(path, key, weight)
        if factors is not None:
            return factors
    factors = decompose(weight, rank)
    _write_entry(folder, path, key, factors)
    return factors


def decompose_named(name: str, weight: Tensor, rank: int | None, cache_dir: str | os.PathLike | None) -> Decomposition:
    """`decompose_cached`, with the layer's name in the error (``layer 'fc1': the weight contains NaN ...``)."""
    try:
        return decompose_cached(weight, rank, cache_dir)
    except SvdtuneError as error:
        raise SvdtuneError(f"layer {name!r}: {error}") from None


def _read_entry(path: str, key: str, weight: Tensor) -> Decomposition | None:
    """The stored decomposition, or None (with a warning) if the entry is damaged."""
    try:
        tensors, metadata = container.read(path, f"SVD cache entry {path!r}")
        factors = _check_entry(tensors, metadata, key, weight)
    except SvdtuneError as error:
        warnings.warn(f"{error} Recomputing this SVD and replacing the entry.", RuntimeWarning, stacklevel=4)
        return None
    return factors


def _check_entry(tensors: dict[str, Tensor], metadata: dict[str, str], key: str, weight: Tensor) -> Decomposition:
    m, n = weight_matrix(weight).shape
    U, sigma, Vh = tensors.get("U"), tensors.get("sigma"), tensors.get("Vh")
    if metadata.get("format") != FORMAT or metadata.get("key") != key or U is None or sigma is None or Vh is None:
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} has the wrong format or key.")
    k = sigma.numel()
    shapes_ok = U.shape == (m, k) and sigma.shape == (k,) and Vh.shape == (k, n) and 1 <= k <= min(m, n)
    dtypes_ok = U.dtype == Vh.dtype == weight.dtype and sigma.dtype == svd_dtype(weight.dtype)
    if not (shapes_ok and dtypes_ok):
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} holds tensors of the wrong shape or dtype.")
    next_sigma = _next_sigma(metadata.get("next_sigma"), k == min(m, n), key)
    device = weight.device
    return Decomposition(U=U.to(device), sigma=sigma.to(device), Vh=Vh.to(device), full_rank=k == min(m, n),
                         next_sigma=next_sigma)


def _next_sigma(text: str | None, full_rank: bool, key: str) -> float | None:
    """The stored sigma_k: "" at full rank, else a finite non-negative number."""
    if full_rank and text == "":
        return None
    try:
        value = float(text) if text and not full_rank else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} has a missing or invalid next_sigma.")
    return value


def _write_entry(folder: str, path: str, key: str, factors: Decomposition) -> None:
    tensors = {"U": factors.U, "sigma": factors.sigma, "Vh": factors.Vh}
    try:
        os.makedirs(folder, exist_ok=True)
        next_sigma = "" if factors.next_sigma is None else repr(factors.next_sigma)
        container.atomic_write(path, container.encode(tensors, {"format": FORMAT, "key": key, "next_sigma": next_sigma}))
    except OSError as error:
        warnings.warn(
            f"cannot write the SVD cache entry {path!r} ({error.strerror or error}); the SVD is not cached: "
            "pass a writable cache_dir, or cache_dir=None.", RuntimeWarning, stacklevel=4,
        )
