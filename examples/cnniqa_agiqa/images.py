"""AGIQA-3K's image files, decoded once per run into a memory-bounded cache.

Every image is decoded (and resized, with --resize) by the check pass before
training (agiqa.check_images), and kept in memory while the total stays within
the byte budget (--cache-mb). Every split and variant then crops from memory.
Images beyond the budget are decoded again on every access, as they were
before the cache existed; a budget of 0 decodes every image on every access.

A cached image costs 3 * W * H bytes (uint8 RGB, W x H after --resize).
Decoding is Pillow's, as IQA-PyTorch does it: Image.open(path).convert("RGB").
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

__all__ = ["resized_size", "image_bytes", "decode_image", "ImageCache", "MEBIBYTE"]

MEBIBYTE = 1 << 20


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `resize` px (0 keeps the size), as decode_image does."""
    if not resize:
        return width, height
    scale = resize / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_bytes(width: int, height: int, resize: int = 0) -> int:
    """Bytes a decoded image of this size takes in the cache: 3 * W * H after resizing."""
    w, h = resized_size(width, height, resize)
    return 3 * w * h


def decode_image(path: str | Path, resize: int = 0) -> torch.Tensor:
    """Decode one image file to (3, H, W) uint8 RGB.

    Args:
        path: the image file (any format Pillow reads; AGIQA-3K ships JPEGs).
        resize: scale the shorter side to this many px (bicubic); 0 keeps the size.

    Returns:
        The image as a (3, H, W) uint8 tensor.

    Raises:
        OSError, ValueError, SyntaxError: Pillow cannot decode the file.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")  # decodes every pixel
        if resize:
            image = image.resize(resized_size(image.width, image.height, resize), Image.BICUBIC)
        array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class ImageCache:
    """The images of a dataset: decoded ones held in memory up to a budget, the rest decoded on access.

    Thread-safe to fill (`offer` from the check pass's threads); read-only afterwards.
    With DataLoader workers (fork), the workers share the parent's cached pages.

    Args:
        root: the image folder.
        names: file names relative to root, one per record.
        resize: shorter side after resizing (bicubic); 0 keeps the original size.
        budget: most bytes of decoded pixels to hold; 0 holds none.

    Example:
        >>> cache = ImageCache("AGIQA-3K", ["a.jpg"], resize=384, budget=1 << 30)  # doctest: +SKIP
        >>> cache.get(0).shape  # decoded now, or taken from memory if offered before  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, names: list[str], resize: int = 0, budget: int = 0) -> None:
        self.root, self.names, self.resize, self.budget = Path(root), list(names), resize, budget
        self.images: list[torch.Tensor | None] = [None] * len(self.names)
        self.nbytes = 0  # bytes held, at most budget
        self.reserved = 0  # bytes promised to offers in flight or done
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def held(self) -> int:
        """How many images are in memory."""
        return sum(image is not None for image in self.images)

    def reserve(self, nbytes: int) -> bool:
        """Promise `nbytes` of the budget to an image about to be decoded; False if it does not fit."""
        with self._lock:
            if self.reserved + nbytes > self.budget:
                return False
            self.reserved += nbytes
            return True

    def offer(self, index: int, image: torch.Tensor) -> None:
        """Hold the decoded (and resized) image of record `index`, whose bytes were reserved."""
        with self._lock:
            self.images[index] = image
            self.nbytes += image.numel()

    def get(self, index: int) -> torch.Tensor:
        """The (3, H, W) uint8 image of record `index`: from memory, else decoded now."""
        image = self.images[index]
        if image is None:
            image = decode_image(self.root / self.names[index], self.resize)
        return image

    def describe(self) -> str:
        """One line: how many images are held, their bytes and the budget."""
        left = len(self) - self.held
        line = (f"{self.held} of {len(self)} decoded images held in memory ({self.nbytes:,} bytes of the "
                f"{self.budget:,}-byte --cache-mb budget)")
        if left:
            line += (f"; the other {left} are decoded again on every access (raise --cache-mb, or pass --resize "
                     "to make them smaller)")
        return line
