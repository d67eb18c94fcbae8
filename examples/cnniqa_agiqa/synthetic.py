"""A built-in, download-free stand-in for KonIQ-10k -> AGIQA-3K.

Two procedural domains, deterministic by seed:

source ("natural"): 1/f fractal textures in a random palette with a few
    soft-edged blobs, distorted by Gaussian blur, white noise and 4x4
    blocking. CNNIQA is pretrained here (the stand-in for KonIQ-10k).
target ("rendered"): saturated colour ramps with hard-edged shapes and
    stripes (an illustration-like style, the stand-in for AI-generated images),
    distorted by blur and noise (weighted differently than in the source) and
    by contrast loss, colour cast and posterization (new to the model).
    The variants adapt to this domain.

Every image gets each of its domain's distortions with probability 0.6, at a
severity s uniform in (0, 1]. Its score is

    MOS = clip(5 * exp(-sum_k w_k * s_k) + N(0, 0.15^2), 0, 5)

with the weights w of WEIGHTS; N is rating noise. Severity to parameter: blur
sigma = 2 s px; noise std = 0.12 s; blocking blend = s; contrast factor
= 1 - 0.7 s; colour cast = blend 0.6 s toward a random tint; posterize levels
= round(24 - 21 s); ringing (available, unused by default) = ideal low-pass at
0.5 - 0.4 s cycles/px. Several versions of each scene (the "prompt") are made,
and splits group by scene. Images are stored as uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SyntheticSet", "make_domain", "WEIGHTS", "RATING_NOISE", "DISTORTIONS", "GENERATOR_VERSION"]

WEIGHTS = {
    "source": {"blur": 1.0, "noise": 1.0, "blocking": 1.0},
    "target": {"blur": 1.0, "noise": 0.3, "contrast": 1.0, "posterize": 0.8, "color": 0.6},
}
GENERATOR_VERSION = 1  # bump when the images or scores change, so cached source models are retrained
RATING_NOISE = 0.15  # std of the simulated rating noise, MOS units
P_PRESENT = 0.6  # probability that each distortion is applied to an image


@dataclass
class SyntheticSet:
    """One synthetic domain held in memory."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    mos: torch.Tensor  # (N,) float32 in [0, 5]
    groups: list[str]  # scene id of each image; splits group by it
    severities: dict[str, torch.Tensor]  # distortion -> (N,) severity in [0, 1]


def _freq_radius(size: int) -> torch.Tensor:
    """|f| in cycles/pixel on the FFT grid: (size, size)."""
    f = torch.fft.fftfreq(size)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def _fractal(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """1/f^a noise normalized to [0, 1]: (n, 3, size, size) in a random palette."""
    radius = _freq_radius(size).clamp_min(1.0 / size)
    alpha = 1.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)  # spectral slope per image
    spectrum = torch.fft.fft2(torch.randn(n, 1, size, size, generator=g)) / radius**alpha
    field = torch.fft.ifft2(spectrum).real  # (n, 1, s, s)
    lo = field.amin(dim=(2, 3), keepdim=True)
    hi = field.amax(dim=(2, 3), keepdim=True)
    field = (field - lo) / (hi - lo)
    dark, light = torch.rand(n, 3, 1, 1, generator=g) * 0.5, 0.5 + torch.rand(n, 3, 1, 1, generator=g) * 0.5
    return dark + (light - dark) * field  # (n, 3, s, s)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1]: two (1, 1, size, size) tensors."""
    t = (torch.arange(size) + 0.5) / size
    return t[None, None, :, None].expand(1, 1, size, size), t[None, None, None, :].expand(1, 1, size, size)


def _blobs(images: torch.Tensor, g: torch.Generator, count: int, hardness: float) -> torch.Tensor:
    """Paint `count` elliptic blobs of random colour; hardness sets edge sharpness."""
    n, _, size, _ = images.shape
    y, x = _grid(size)
    for _ in range(count):
        cy, cx, ry, rx = (torch.rand(4, n, 1, 1, 1, generator=g) * torch.tensor([1, 1, 0.25, 0.25]).view(4, 1, 1, 1, 1))
        d = ((y - cy) / (ry + 0.06)) ** 2 + ((x - cx) / (rx + 0.06)) ** 2  # (n, 1, s, s)
        mask = torch.sigmoid((1.0 - d) * hardness)
        images = images * (1 - mask) + torch.rand(n, 3, 1, 1, generator=g) * mask
    return images


def _content_source(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Natural-looking content: fractal texture plus soft blobs."""
    return _blobs(_fractal(n, size, g), g, count=4, hardness=15.0).clamp(0, 1)


def _content_target(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Illustration-like content: saturated gradient, hard shapes, stripes."""
    y, x = _grid(size)
    angle = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    ramp = (x * torch.cos(angle) + y * torch.sin(angle) + 1.5) / 3.0  # (n, 1, s, s) in [0, 1]
    a, b = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    images = a + (b - a) * ramp
    images = _blobs(images, g, count=4, hardness=40.0)
    freq = 6 + 10 * torch.rand(n, 1, 1, 1, generator=g)
    stripes = (torch.sin(2 * math.pi * freq * (x * torch.sin(angle) - y * torch.cos(angle))) > 0.6).float()
    region = (x > torch.rand(n, 1, 1, 1, generator=g) * 0.6).float() * (y < 0.3 + torch.rand(n, 1, 1, 1, generator=g) * 0.7).float()
    return (images * (1 - 0.5 * stripes * region)).clamp(0, 1)


def _lowpass(images: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    """Filter in the frequency domain; transfer is (n, 1, s, s) over the FFT grid."""
    return torch.fft.ifft2(torch.fft.fft2(images) * transfer).real


def _blur(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur, sigma = 2 s pixels (circular boundary, in the FFT domain)."""
    sigma = 2.0 * s
    return _lowpass(images, torch.exp(-2 * (math.pi * sigma * _freq_radius(images.shape[-1])) ** 2))


def _blocking(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blend toward 4x4 block means by s (JPEG-like blocking)."""
    blocks = F.interpolate(F.avg_pool2d(images, 4), scale_factor=4, mode="nearest")
    return images + s * (blocks - images)


def _noise(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive white Gaussian noise of std 0.12 s."""
    return images + 0.12 * s * torch.randn(images.shape, generator=g)


def _ringing(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Ideal low-pass at 0.5 - 0.4 s cycles/px: Gibbs overshoot at every edge."""
    ringing = _lowpass(images, (_freq_radius(images.shape[-1]) <= 0.5 - 0.4 * s).float())
    return torch.where(s > 0, ringing, images)


def _contrast(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Scale deviations from the image mean by 1 - 0.7 s."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (1.0 - 0.7 * s) * (images - mean)


def _color(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour cast: blend 0.6 s toward a random tint."""
    tint = torch.rand(images.shape[0], 3, 1, 1, generator=g)
    return images + 0.6 * s * (tint - images)


def _posterize(images: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Quantize each channel to round(24 - 21 s) levels."""
    levels = torch.round(24 - 21 * s) - 1
    return torch.where(s > 0, torch.round(images.clamp(0, 1) * levels) / levels, images)


# Distortion name -> function(images (n,3,s,s), severity (n,1,1,1), generator), applied in this order.
DISTORTIONS = {"blur": _blur, "ringing": _ringing, "blocking": _blocking, "contrast": _contrast,
               "color": _color, "posterize": _posterize, "noise": _noise}


def _distort(images: torch.Tensor, sev: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """Apply every distortion in `sev` at its per-image severity, in DISTORTIONS order."""
    n = images.shape[0]
    for name, function in DISTORTIONS.items():
        if name in sev:
            images = function(images, sev[name].view(n, 1, 1, 1), g)
    return images.clamp(0, 1)


def _severities(names: list[str], n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per image and distortion: 0 (absent, prob 1 - P_PRESENT) or uniform (0, 1]."""
    out = {}
    for name in names:
        present = torch.rand(n, generator=g) < P_PRESENT
        out[name] = torch.where(present, 1.0 - torch.rand(n, generator=g), torch.zeros(n))
    return out


def make_domain(domain: str, scenes: int, versions: int, size: int = 64, seed: int = 0) -> SyntheticSet:
    """Generate one synthetic domain.

    Args:
        domain: "source" (pretraining) or "target" (adaptation).
        scenes: number of distinct contents (groups).
        versions: distorted versions per scene.
        size: image side in pixels (at least 16).
        seed: random seed; equal arguments give identical data.

    Returns:
        A SyntheticSet with scenes * versions images.

    Raises:
        ValueError: unknown domain or too small a size/count.
    """
    if domain not in WEIGHTS:
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    if size < 16 or size % 4 or scenes < 1 or versions < 1:
        raise ValueError(f"need a size >= 16 divisible by 4 (blocking uses 4x4 blocks) and at least one scene "
                         f"and version, got size {size}, {scenes} scenes, {versions} versions")
    g = torch.Generator().manual_seed(seed * 2 + (domain == "target"))
    content = (_content_source if domain == "source" else _content_target)(scenes, size, g)
    n = scenes * versions
    content = content.repeat_interleave(versions, dim=0)  # (n, 3, s, s)
    sev = _severities(list(WEIGHTS[domain]), n, g)
    images = _distort(content, sev, g)
    badness = sum(WEIGHTS[domain][k] * sev[k] for k in WEIGHTS[domain])
    mos = (5.0 * torch.exp(-badness) + RATING_NOISE * torch.randn(n, generator=g)).clamp(0, 5)
    groups = [f"{domain}-{i // versions:04d}" for i in range(n)]
    pixels = (images * 255).round().to(torch.uint8)
    return SyntheticSet(images=pixels, mos=mos.float(), groups=groups, severities=sev)
