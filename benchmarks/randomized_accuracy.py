"""Accuracy of the randomized truncated SVD (svdtune.randomized) against torch.linalg.svd.

For matrices with three kinds of spectra it prints, per (iterations, oversample), the largest
relative error of the top-k singular values, max_i |s_i - s_i*| / s_i*, and how far the kept
subspace is from the best one: ||W - U U^T W||_2 / s_{k+1}* (1.0 is optimal).

Spectra (W = P diag(s) Q^T with random orthogonal P, Q, unless said otherwise):
- power: s_i = (i + 1) ** -0.5, a slowly decaying trained-like spectrum;
- trained: a Gaussian matrix (the random init) plus 32 power-law spikes (what training adds);
- flat: a plain Gaussian matrix (Marchenko-Pastur spectrum: the worst case);
- clustered: 12 clusters of 8 values 0.92**c (1e-4 relative jitter), then a flat tail of 0.05.

Run from the repository root: PYTHONPATH=. python benchmarks/randomized_accuracy.py [--shape 1024 2816] [--rank 64]
"""

from __future__ import annotations

import argparse

import torch

from svdtune.randomized import RandomizedSVD, randomized_svd


def orthogonal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q


def spectrum_matrix(kind: str, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float32 (m, n) matrix with the named kind of spectrum (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    if kind in ("flat", "trained"):
        matrix = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
        if kind == "trained":
            spikes = 4.0 * torch.arange(1, 33, dtype=torch.float64) ** -0.7
            matrix += orthogonal(m, 32, g) @ torch.diag(spikes) @ orthogonal(n, 32, g).T
        return matrix.float()
    if kind == "power":
        s = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    elif kind == "clustered":
        s = torch.full((r,), 0.05, dtype=torch.float64)
        clusters = torch.repeat_interleave(0.92 ** torch.arange(12, dtype=torch.float64), 8)
        s[: clusters.numel()] = clusters * (1 + 1e-4 * torch.randn(clusters.numel(), generator=g, dtype=torch.float64))
        s = s.sort(descending=True).values
    else:
        raise ValueError(kind)
    return ((orthogonal(m, r, g) * s) @ orthogonal(n, r, g).T).float()


KINDS = ("power", "trained", "flat", "clustered")


def errors(matrix: torch.Tensor, k: int, params: RandomizedSVD, exact: torch.Tensor) -> tuple[float, float]:
    """(largest relative error of the top k singular values, residual ratio) of one randomized SVD."""
    U, s, _ = randomized_svd(matrix, k, params)
    relative = float(((s[:k] - exact[:k]).abs() / exact[:k]).max())
    U = U[:, :k].double()
    residual = matrix.double() - U @ (U.T @ matrix.double())
    return relative, float(torch.linalg.matrix_norm(residual, ord=2) / exact[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[1024, 2816])
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    (m, n), k = args.shape, args.rank
    settings = [(2, 8), (2, 16), (4, 8), (4, 16), (6, 16)]
    print(f"{m}x{n}, rank {k}: max relative error of the top-k singular values / residual ratio (1.0 = optimal)")
    print("spectrum   " + "  ".join(f"q={q} p={p:<2}".ljust(17) for q, p in settings))
    for kind in KINDS:
        matrix = spectrum_matrix(kind, m, n)
        exact = torch.linalg.svdvals(matrix.double())
        cells = []
        for q, p in settings:
            relative, ratio = errors(matrix, k, RandomizedSVD(oversample=p, iterations=q), exact)
            cells.append(f"{relative:.1e} / {ratio:.3f}".ljust(17))
        print(f"{kind:<10} " + "  ".join(cells))


if __name__ == "__main__":
    main()
