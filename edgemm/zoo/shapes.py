"""Procedural images of coloured shapes (numpy only).

Small RGB images (float32 [3, H, W] in [0, 1], values on the 1/255 grid like decoded 8-bit images) with
one or two flat-coloured shapes on a noisy dark background. Shapes, colours and quadrants are the
vocabulary every zoo dataset talks about; jitter in size, position, hue and background keeps the tasks
from being solved by a single pixel.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
# Quadrants, named as two words so captions can say "the top left".
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# A finer 3x3 grid for captions: neighbouring cells make retrieval less trivial than quadrants.
GRID_POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
                  "bottom right")

_RGB = np.array([
    [0.90, 0.15, 0.10],  # red
    [0.15, 0.80, 0.20],  # green
    [0.15, 0.30, 0.95],  # blue
    [0.95, 0.85, 0.15],  # yellow
], dtype=np.float32)

_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def quadrant_centre(position: int, rng: np.random.Generator) -> tuple[float, float]:
    """Centre (x, y) inside quadrant ``position`` with a little jitter."""
    half = IMAGE_SIZE / 2
    cx = half * (position % 2) + half / 2 + rng.uniform(-2.0, 2.0)
    cy = half * (position // 2) + half / 2 + rng.uniform(-2.0, 2.0)
    return cx, cy


def grid_centre(position: int, rng: np.random.Generator) -> tuple[float, float]:
    """Centre (x, y) inside cell ``position`` of the 3x3 grid, with a little jitter."""
    cell = IMAGE_SIZE / 3
    cx = cell * (position % 3) + cell / 2 + rng.uniform(-1.5, 1.5)
    cy = cell * (position // 3) + cell / 2 + rng.uniform(-1.5, 1.5)
    return cx, cy


def shape_mask(shape: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean [H, W] mask of ``SHAPES[shape]`` centred at (cx, cy)."""
    dx, dy = _GRID_X - cx, _GRID_Y - cy
    if SHAPES[shape] == "circle":
        return dx * dx + dy * dy <= radius * radius
    if SHAPES[shape] == "square":
        side = 0.82 * radius
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if SHAPES[shape] == "triangle":
        # Apex up: the half-width grows linearly from the apex to the base.
        top, bottom = -radius, 0.85 * radius
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) * 0.62)
    if SHAPES[shape] == "cross":
        arm = 0.32 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape index {shape}")


def background(rng: np.random.Generator) -> np.ndarray:
    """Dark, slightly tinted, noisy canvas [3, H, W]."""
    base = rng.uniform(0.0, 0.25) + rng.uniform(-0.04, 0.04, size=(3, 1, 1))
    noise = rng.normal(0.0, 0.03, size=(3, IMAGE_SIZE, IMAGE_SIZE))
    return (base + noise).astype(np.float32)


def paint(canvas: np.ndarray, shape: int, color: int, cx: float, cy: float, radius: float,
          rng: np.random.Generator) -> None:
    """Paint one shape onto ``canvas`` in place, with per-object colour jitter."""
    rgb = np.clip(_RGB[color] + rng.uniform(-0.08, 0.08, size=3), 0.0, 1.0).astype(np.float32)
    mask = shape_mask(shape, cx, cy, radius)
    canvas[:, mask] = rgb[:, None]


def finish(canvas: np.ndarray) -> np.ndarray:
    """Clip and snap to the 8-bit grid (what a decoded JPEG/PNG would give)."""
    return (np.round(np.clip(canvas, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def random_radius(rng: np.random.Generator, low: float = 4.5, high: float = 6.5) -> float:
    return float(rng.uniform(low, high))
