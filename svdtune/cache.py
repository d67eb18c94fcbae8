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

A valid checksum proves only that the entry is intact, not that it belongs to this
weight (an entry copied or renamed from another weight has a valid one too). So every
entry is also checked against the weight it is used for, at the cost of a few
matrix-vector products (`check_factors`); a failed check recomputes, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings

import torch
from torch import Tensor

from svdtune import container
from svdtune.decompose import (
    Decomposition, choose_svd, decompose, decomposition_cost, svd_driver, svd_dtype, weight_matrix,
)
from svdtune.errors import SvdtuneError
from svdtune.progress import LayerProgress
from svdtune.randomized import RandomizedSVD

PROBE_COLUMNS = 4  # random vectors x in the reconstruction probe
SPOT_COLUMNS = 8  # singular vectors in the orthonormality spot check
TOLERANCE = 16  # in units of the rounding scale r (see check_factors): a wide margin over honest rounding
POWER_STEPS = 3  # power iterations estimating the largest singular value a truncated SVD left out
RANDOMIZED_MARGIN = 2.0  # a randomized SVD's residual may exceed its sigma_k a little; twice is a gross error
CACHE_VERSION = "2"  # bump when decompose() changes what it returns for the same input (2: next_sigma)
FORMAT = "svdtune.svd-cache"


def algorithm(weight: Tensor, svd: RandomizedSVD | None = None) -> str:
    """What, besides the weight and rank, decides the decomposition of ``weight`` by the
    resolved method ``svd`` (a `RandomizedSVD`, or None for the exact SVD; see `choose_svd`)."""
    driver = svd_driver(weight.device) or "default"
    method = "" if svd is None else f";{svd.describe()}"  # nothing for the exact SVD: older entries stay valid
    return f"svdtune-cache-{CACHE_VERSION};torch-{torch.__version__};{weight.device.type};{driver};signfix-maxabs{method}"


def cache_key(weight: Tensor, rank: int | None, svd: RandomizedSVD | None = None) -> str:
    """The hex SHA-256 naming the cache entry of (weight, rank, resolved method) under the current algorithm."""
    digest = hashlib.sha256()
    description = f"{tuple(weight.shape)};{weight.dtype};rank={rank};{algorithm(weight, svd)}"
    digest.update(description.encode("utf-8") + b"\0")
    digest.update(container.tensor_bytes(weight))
    return digest.hexdigest()


def decompose_cached(
    weight: Tensor, rank: int | None, cache_dir: str | os.PathLike | None, svd: str | RandomizedSVD | None = "auto"
) -> Decomposition:
    """`decompose`, reusing the stored result from ``cache_dir`` when there is one.

    Args:
        weight: a Linear/Conv weight; it is not modified.
        rank: as for `decompose`.
        cache_dir: the cache folder (created if missing); None computes without caching.
        svd: the method, as for `svdtune.decompose.choose_svd`.

    Returns:
        The Decomposition, equal to ``decompose(weight, rank, svd)`` on this device and library.

    Raises:
        SvdtuneError: as `decompose` (a non-finite weight, an impossible method).

    Example:
        >>> factors = decompose_cached(layer.weight, rank=None, cache_dir="~/.cache/svdtune")
    """
    if cache_dir is None:
        return decompose(weight, rank, svd)
    m, n = weight_matrix(weight).shape
    method = choose_svd((m, n), None if rank is None else min(rank, m, n), svd)
    folder = os.path.expanduser(os.fspath(cache_dir))
    key = cache_key(weight.detach(), rank, method)
    path = os.path.join(folder, f"{key}.safetensors")
    if os.path.exists(path):
        factors = _read_entry(path, key, weight, rank)
        if factors is not None:
            return dataclasses.replace(factors, svd=method)
    factors = decompose(weight, rank, "exact" if method is None else method)
    _write_entry(folder, path, key, factors)
    return factors


def decompose_named(
    name: str, weight: Tensor, rank: int | None, cache_dir: str | os.PathLike | None, svd: str | RandomizedSVD | None = "auto"
) -> Decomposition:
    """`decompose_cached`, with the layer's name in the error (``layer 'fc1': the weight contains NaN ...``)."""
    try:
        return decompose_cached(weight, rank, cache_dir, svd)
    except SvdtuneError as error:
        raise SvdtuneError(f"layer {name!r}: {error}") from None


def _read_entry(path: str, key: str, weight: Tensor, rank: int | None) -> Decomposition | None:
    """The stored decomposition, or None (with a warning) if the entry is damaged or not of this weight."""
    try:
        tensors, metadata = container.read(path, f"SVD cache entry {path!r}")
        factors = _check_entry(tensors, metadata, key, weight, rank)
    except SvdtuneError as error:
        warnings.warn(f"{error} Recomputing this SVD and replacing the entry.", RuntimeWarning, stacklevel=4)
        return None
    return factors


def _check_entry(tensors: dict[str, Tensor], metadata: dict[str, str], key: str, weight: Tensor,
                 rank: int | None) -> Decomposition:
    m, n = weight_matrix(weight).shape
    U, sigma, Vh = tensors.get("U"), tensors.get("sigma"), tensors.get("Vh")
    if metadata.get("format") != FORMAT or metadata.get("key") != key or U is None or sigma is None or Vh is None:
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} has the wrong format or key.")
    k = sigma.numel()
    shapes_ok = U.shape == (m, k) and sigma.shape == (k,) and Vh.shape == (k, n) and 1 <= k <= min(m, n)
    dtypes_ok = U.dtype == Vh.dtype == weight.dtype and sigma.dtype == svd_dtype(weight.dtype)
    if not (shapes_ok and dtypes_ok):
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} holds tensors of the wrong shape or dtype.")
    expected = min(m, n) if rank is None else min(rank, m, n)
    if k != expected:
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} holds {k} singular triplets where rank={rank} needs {expected}.")
    next_sigma = _next_sigma(metadata.get("next_sigma"), k == min(m, n), key)
    device = weight.device
    factors = Decomposition(U=U.to(device), sigma=sigma.to(device), Vh=Vh.to(device), full_rank=k == min(m, n),
                            next_sigma=next_sigma)
    why = check_factors(factors, weight, seed=int(key[:15], 16))
    if why:
        raise SvdtuneError(f"SVD cache entry for key {key[:12]} is not a decomposition of this weight: {why}.")
    return factors


def check_factors(factors: Decomposition, weight: Tensor, seed: int = 0) -> str | None:
    """Why ``factors`` are not the top-k SVD of ``weight``, or None if the cheap checks pass.

    Checked, in the SVD's dtype (float32, float64 for float64 weights) on the weight's device:
    every value finite; sigma >= 0, descending, and next_sigma <= sigma[-1]; for up to 8 of the
    singular vector pairs, U^T U and Vh Vh^T equal the identity within TOLERANCE * r; and for
    4 random vectors X (n, 4), seeded by ``seed``: U^T W X = diag(sigma) Vh X (the triplets are
    singular triplets of W) and ||W X - U diag(sigma) Vh X|| <= next_sigma ||X|| (what is left
    out is no larger than next_sigma; = 0 at full rank), within TOLERANCE * r * sigma_max * ||X||; and, for a
    truncated SVD, that no singular value left out is larger than sigma_k, the smallest kept (estimated by
    `POWER_STEPS` power iterations; twice sigma_k for a randomized SVD, whose residual is near-optimal only).
    r = eps(the weight's dtype, in which U and Vh are stored) + sqrt(max(m, n)) * eps(SVD dtype):
    storing U, Vh rounds them by eps/2 per entry, and products of length m or n round by about
    sqrt(length) * eps. Cost: 3 products of W with 4 vectors, against an SVD's min(m, n) times m n.
    """
    U, sigma, Vh = factors.U, factors.sigma, factors.Vh
    work = sigma.dtype
    if not all(bool(torch.isfinite(t).all()) for t in (U, sigma, Vh)):
        return "it holds NaN or infinity"
    next_sigma = factors.next_sigma or 0.0
    if bool((sigma < 0).any()) or bool((sigma[:-1] < sigma[1:]).any()) or next_sigma > float(sigma[-1]):
        return "its singular values are not non-negative and descending"
    matrix = weight_matrix(weight.detach()).to(work)
    (m, n), k = matrix.shape, sigma.numel()
    r = torch.finfo(U.dtype).eps + math.sqrt(max(m, n)) * torch.finfo(work).eps
    spot = torch.linspace(0, k - 1, min(k, SPOT_COLUMNS), device=U.device).round().long()
    u, v = U.to(work)[:, spot], Vh.to(work)[spot]
    eye = torch.eye(spot.numel(), dtype=work, device=U.device)
    if max(float((u.T @ u - eye).abs().max()), float((v @ v.T - eye).abs().max())) > TOLERANCE * r:
        return "its singular vectors are not orthonormal"
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, PROBE_COLUMNS, generator=generator, dtype=work).to(U.device)
    wx, vx = matrix @ x, Vh.to(work) @ x  # (m, 4), (k, 4)
    bound = TOLERANCE * r * float(sigma[0]) * float(x.norm())
    if float((U.to(work).T @ wx - sigma[:, None] * vx).norm()) > bound:
        return "U^T W x differs from diag(sigma) Vh x for random x"
    if float((wx - U.to(work) @ (sigma[:, None] * vx)).norm()) > next_sigma * float(x.norm()) + bound:
        return "W x differs from U diag(sigma) Vh x for random x by more than the singular values left out allow"
    if not factors.full_rank:  # a top-k SVD leaves out nothing larger than it keeps
        margin = 1.0 if factors.svd is None else RANDOMIZED_MARGIN
        if _largest_left_out(matrix, U.to(work), sigma, Vh.to(work), x) > margin * float(sigma[-1]) + bound / float(x.norm()):
            return "a singular value left out is larger than the smallest one kept (not the top singular triplets)"
    return None


def _largest_left_out(matrix: Tensor, U: Tensor, sigma: Tensor, Vh: Tensor, x: Tensor) -> float:
    """A lower estimate of the largest singular value of W - U diag(sigma) Vh (what a top-k SVD leaves out):
    `POWER_STEPS` power iterations from the probe vectors ``x``, 4 products with W each."""
    def left_out(v: Tensor) -> Tensor:  # (n, c) -> (m, c)
        return matrix @ v - U @ (sigma[:, None] * (Vh @ v))

    def left_out_t(r: Tensor) -> Tensor:  # (m, c) -> (n, c)
        return matrix.T @ r - Vh.T @ (sigma[:, None] * (U.T @ r))

    v = x / x.norm(dim=0).clamp_min(torch.finfo(x.dtype).tiny)
    for _ in range(POWER_STEPS):
        v = left_out_t(left_out(v))
        v = v / v.norm(dim=0).clamp_min(torch.finfo(x.dtype).tiny)
    return float(left_out(v).norm(dim=0).max())


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


def decompose_layers(
    weights: dict[str, Tensor], rank: int | None, cache_dir: str | os.PathLike | None,
    svd: str | RandomizedSVD | None = "auto", progress: bool = True,
) -> dict[str, Decomposition]:
    """`decompose_named` for each layer, with a progress bar weighted by each layer's cost.

    Every layer's method is resolved first, so an impossible one fails before any SVD.

    Args:
        weights: {layer name: weight}.
        rank, cache_dir, svd: as for `decompose_cached`.
        progress: show the bar (on a terminal, once it takes more than a second; see `svdtune.progress`).

    Returns:
        {layer name: Decomposition}, in the order of ``weights``.

    Raises:
        SvdtuneError: naming the layer, as `decompose_named`.
    """
    costs = {}
    for name, weight in weights.items():
        shape = tuple(weight_matrix(weight).shape)
        try:
            method = choose_svd(shape, None if rank is None else min(rank, *shape), svd)
        except SvdtuneError as error:
            raise SvdtuneError(f"layer {name!r}: {error}") from None
        costs[name] = decomposition_cost(shape, min(rank or min(shape), *shape), method)
    factors = {}
    with LayerProgress(list(costs.values()), progress) as bar:
        for name, weight in weights.items():
            factors[name] = decompose_named(name, weight, rank, cache_dir, svd)
            bar.advance(costs[name])
    return factors
