"""Synthetic code grids with learnable structure, for tests and the no-download smoke default.

Image i of class c = i % num_classes is the class's fixed smooth pattern with 10% of its codes replaced by random
ones; its second view is the horizontal flip. A model can learn the patterns, so the loss visibly falls.
"""

from __future__ import annotations

import hashlib

import grain
import numpy as np

NOISE = 0.1


class SyntheticCodes(grain.sources.RandomAccessDataSource):
  """Deterministic in (seed, index); items look like decoded code records: (views (2, S) uint16, label)."""

  def __init__(self, vocab_size: int, grid: int, num_classes: int, *, num_images: int, seed: int):
    self._vocab, self._grid, self._classes, self._n, self._seed = vocab_size, grid, num_classes, num_images, seed
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    classes = np.arange(num_classes)[:, None, None]
    # Smooth in space (2x2 blocks share a code) and distinct per class.
    self._patterns = ((classes * 37 + (rows // 2) * 11 + (cols // 2) * 13) % vocab_size).astype(np.uint16)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([self._seed, int(index)])
    label = int(index) % self._classes
    grid = self._patterns[label].copy()
    noise = rng.random(grid.shape) < NOISE
    grid[noise] = rng.integers(0, self._vocab, int(noise.sum()))
    views = np.stack([grid.reshape(-1), grid[:, ::-1].reshape(-1)])
    return views, label

  def read_many(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
    return [self[i] for i in indices]

  def fingerprint(self) -> str:
    key = f"synthetic:{self._vocab}:{self._grid}:{self._classes}:{self._n}:{self._seed}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
