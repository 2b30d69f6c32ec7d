"""Image grids for looking at reconstructions, pyramids and generator samples.

Everything here turns tensors in the tokenizer convention (float, ``[-1, 1]``, channels first)
into 8-bit RGB pictures with numpy and Pillow and writes them as PNG (the format follows the file
extension). Quantisation is the one the metrics use (:func:`hieratok.metrics.image.quantize_to_uint8`),
so a saved grid holds exactly the pixels that PSNR / SSIM scored.

Grid layout (all sizes in pixels; ``pad`` between cells and around the border)::

    +----------+-----+--------+-----+--------+-----+
    |          | pad | col 0  | pad | col 1  | pad |   <- column-label band (only with col_labels)
    +----------+-----+--------+-----+--------+-----+
    | row lbl  | pad | cell   | pad | cell   | pad |   cell = cell_h x cell_w; an image smaller
    | (opt.)   |     | (0, 0) |     | (0, 1) |     |   than its cell is centred in it
    +----------+-----+--------+-----+--------+-----+

Shape legend: B batch, C channels (1 or 3), H height, W width.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..metrics.image import quantize_to_uint8

__all__ = [
    "ImageGrid",
    "to_uint8",
    "render_image_grid",
    "save_image_grid",
    "reconstruction_grid",
    "pyramid_strip",
    "save_samples_grid",
]

logger = logging.getLogger(__name__)

ImageLike = torch.Tensor | np.ndarray
Size = int | tuple[int, int]

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


def to_uint8(x: ImageLike, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """Convert a channels-first image (or batch) to uint8 channels-last numpy.

    Float values are mapped ``value_range[0] -> 0`` and ``value_range[1] -> 255``, clamped and
    rounded half up, i.e. ``floor((x + 1) * 127.5 + 0.5)`` for ``[-1, 1]`` -- the same levels the
    PSNR / SSIM metrics score. uint8 input is passed through. NaN (a diverged run) becomes 0,
    black, with a logged warning.

    Args:
        x: ``(C, H, W)`` or ``(B, C, H, W)`` tensor or array, float in ``value_range`` or uint8.
        value_range: ``(low, high)`` of float input.

    Returns:
        ``(H, W, C)`` or ``(B, H, W, C)`` uint8 numpy array (on CPU).
    """
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.ndim not in (3, 4):
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(t.shape)}")
    t = t.detach()
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            logger.warning("%d of %d image values are NaN or infinite (a diverged run?); NaN is drawn black",
                           bad, t.numel())
            t = torch.nan_to_num(t, nan=float(value_range[0]))
    q = quantize_to_uint8(t, value_range).cpu()
    return q.movedim(-3, -1).contiguous().numpy()


def _as_rgb_hwc(img: ImageLike) -> np.ndarray:
    """One image -> (H, W, 3) uint8. Accepts (C, H, W) or (1, C, H, W) with C in {1, 3}."""
    if img.ndim == 4:
        if img.shape[0] != 1:
            raise ValueError(f"expected a single image, got a batch of shape {tuple(img.shape)}")
        img = img[0]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, H, W) or (1, H, W), got {tuple(img.shape)}")
    a = to_uint8(img)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _fit_size(h: int, w: int, box_h: int, box_w: int) -> tuple[int, int]:
    """Largest (h', w') with the aspect ratio of (h, w) that fits in (box_h, box_w)."""
    s = min(box_h / h, box_w / w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def _resize_nearest(a_HWC: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize; for an integer factor every source pixel becomes an exact block."""
    h, w = a_HWC.shape[:2]
    if (h, w) == (out_h, out_w):
        return a_HWC
    # sample at output pixel centres: src = floor((i + 0.5) * in / out)
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return a_HWC[rows][:, cols]


def _load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font (a scalable one on Pillow >= 10.1, the bitmap one otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _wrap(font, text: str, max_w: int) -> list[str]:
    """Greedy word wrap to ``max_w`` pixels.

    Lines break at spaces, then after ``-``, ``_`` or ``/`` inside a word, and only as a last
    resort between characters; explicit ``\n`` starts a new line.
    """
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        # pieces with the separator that joins them to the previous piece on the same line
        pieces = [(piece, " " if j == 0 and i > 0 else "")
                  for i, word in enumerate(paragraph.split(" "))
                  for j, piece in enumerate(re.split(r"(?<=[-_/])", word))]
        line = ""
        for piece, sep in pieces:
            cand = line + sep + piece if line else piece
            if _text_size(font, cand)[0] <= max_w:
                line = cand
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in piece:  # the piece alone may still be too long
                if line and _text_size(font, line + ch)[0] > max_w:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


@dataclass
class ImageGrid:
    """A rendered grid and where each cell landed.

    Attributes:
        array: ``(H, W, 3)`` uint8 picture.
        cell_h: Height of every cell.
        cell_w: Width of every cell.
        cell_origins: ``cell_origins[r][c]`` = ``(top, left)`` pixel of cell ``(r, c)``.
        image_boxes: ``image_boxes[r][c]`` = ``(top, left, h, w)`` of the image drawn in cell
            ``(r, c)`` after resizing and centring, or ``None`` for an empty cell.
    """

    array: np.ndarray
    cell_h: int
    cell_w: int
    cell_origins: list[list[tuple[int, int]]] = field(default_factory=list)
    image_boxes: list[list[tuple[int, int, int, int] | None]] = field(default_factory=list)

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.array, mode="RGB")


def render_image_grid(
    rows: Sequence[Sequence[ImageLike | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 2,
    upscale_to: Size | None = None,
    font_size: int | None = None,
    background: tuple[int, int, int] = BACKGROUND,
) -> ImageGrid:
    """Lay out images of possibly different sizes in a grid (in memory).

    Args:
        rows: ``rows[r][c]`` is a ``(3, H, W)`` (or ``(1, H, W)``) image in ``[-1, 1]`` (or uint8),
            or ``None`` for an empty cell. Rows may have different lengths.
        row_labels: One label per row, drawn left of the row.
        col_labels: One label per column, drawn above it (wrapped to the cell width).
        pad: Pixels between cells and around the border.
        upscale_to: ``None``: every cell is as large as the largest image and smaller images are
            centred in it at their own size. An int ``S`` or ``(H, W)``: every image is resized
            with nearest neighbour (aspect ratio kept) to fit an ``S x S`` / ``H x W`` cell, so the
            small levels of a pyramid show as blocky but visible pictures.
        font_size: Label font size in pixels; default scales with the cell size (12..24).
        background: RGB of padding and empty space.

    Returns:
        The :class:`ImageGrid`.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("rows must hold at least one image")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"got {len(row_labels)} row_labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"got {len(col_labels)} col_labels for {n_cols} columns")

    cells = [[None if im is None else _as_rgb_hwc(im) for im in row] for row in rows]
    sizes = [a.shape[:2] for row in cells for a in row if a is not None]
    if not sizes:
        raise ValueError("rows must hold at least one image (all cells are None)")
    if upscale_to is None:
        cell_h, cell_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    else:
        cell_h, cell_w = (upscale_to, upscale_to) if isinstance(upscale_to, int) else tuple(upscale_to)
        if cell_h < 1 or cell_w < 1:
            raise ValueError(f"upscale_to must be positive, got {upscale_to}")
        cells = [[None if a is None else _resize_nearest(a, *_fit_size(*a.shape[:2], cell_h, cell_w))
                  for a in row] for row in cells]

    font = _load_font(font_size or int(np.clip(min(cell_h, cell_w) // 8, 12, 24)))
    line_h = _text_size(font, "Hgypq")[1] + 2
    margin = max(pad, 4)

    # left band for row labels: as wide as the widest label, capped to keep the grid readable
    label_w = 0
    row_lines: list[list[str]] = []
    if row_labels is not None:
        max_label_w = max(4 * cell_w, 160)
        widest = max(_text_size(font, str(s))[0] for s in row_labels)
        label_w = min(widest, max_label_w) + 2 * margin
        row_lines = [_wrap(font, str(s), label_w - 2 * margin) for s in row_labels]
    # top band for column labels, wrapped to the cell width
    header_h = 0
    col_lines: list[list[str]] = []
    if col_labels is not None:
        col_lines = [_wrap(font, str(s), max(cell_w - 2, 8)) for s in col_labels]
        header_h = max(len(ls) for ls in col_lines) * line_h + margin

    grid_w = label_w + pad + n_cols * (cell_w + pad)
    grid_h = header_h + pad + n_rows * (cell_h + pad)
    canvas = np.empty((grid_h, grid_w, 3), dtype=np.uint8)
    canvas[:] = np.asarray(background, dtype=np.uint8)

    origins: list[list[tuple[int, int]]] = []
    boxes: list[list[tuple[int, int, int, int] | None]] = []
    for r, row in enumerate(cells):
        top = header_h + pad + r * (cell_h + pad)
        origins.append([])
        boxes.append([])
        for c in range(n_cols):
            left = label_w + pad + c * (cell_w + pad)
            origins[r].append((top, left))
            a = row[c] if c < len(row) else None
            if a is None:
                boxes[r].append(None)
                continue
            h, w = a.shape[:2]
            y, x = top + (cell_h - h) // 2, left + (cell_w - w) // 2
            canvas[y:y + h, x:x + w] = a
            boxes[r].append((y, x, h, w))

    if row_labels is not None or col_labels is not None:
        pil = Image.fromarray(canvas, mode="RGB")
        draw = ImageDraw.Draw(pil)
        for c, lines in enumerate(col_lines):
            cx = label_w + pad + c * (cell_w + pad) + cell_w // 2
            for i, line in enumerate(lines):
                y = header_h - margin // 2 - (len(lines) - i) * line_h
                draw.text((cx, y), line, fill=TEXT_COLOUR, font=font, anchor="ma")
        for r, lines in enumerate(row_lines):
            cy = header_h + pad + r * (cell_h + pad) + cell_h // 2 - len(lines) * line_h // 2
            for i, line in enumerate(lines):
                draw.text((label_w - margin, cy + i * line_h), line, fill=TEXT_COLOUR, font=font,
                          anchor="ra")
        canvas = np.asarray(pil).copy()
    return ImageGrid(canvas, cell_h, cell_w, origins, boxes)


def _save(grid: ImageGrid, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.to_pil().save(path)
    logger.info("wrote %s (%dx%d)", path, grid.array.shape[1], grid.array.shape[0])
    return path


def save_image_grid(
    rows: Sequence[Sequence[ImageLike | None]],
    path: str | os.PathLike,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 2,
    upscale_to: Size | None = None,
    font_size: int | None = None,
) -> ImageGrid:
    """Render a grid of images of possibly different sizes and save it (PNG by extension).

    See :func:`render_image_grid` for the arguments and the layout.

    Returns:
        The rendered :class:`ImageGrid` (with the cell positions).
    """
    grid = render_image_grid(rows, row_labels, col_labels, pad, upscale_to, font_size)
    _save(grid, path)
    return grid


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")


def _side(x: torch.Tensor) -> str:
    h, w = x.shape[-2], x.shape[-1]
    return f"{h}px" if h == w else f"{h}x{w}px"


def reconstruction_grid(
    inputs: torch.Tensor,
    pyramids: Mapping[str, Sequence[torch.Tensor] | torch.Tensor],
    path: str | os.PathLike,
    max_images: int = 8,
    pad: int = 2,
) -> ImageGrid:
    """Side-by-side reconstructions: one row per image, ``input | model A scales | model B scales``.

    Every pyramid level is upscaled (nearest) to the input size so the columns line up and the
    coarse levels stay visible; the column labels give each level's true size.

    Args:
        inputs: ``(B, 3, H, W)`` ground-truth images in ``[-1, 1]``.
        pyramids: ``{model name: [level (B, 3, h_k, w_k) coarse to fine]}``; a single tensor
            stands for a one-level (single-scale) reconstruction.
        path: Output file.
        max_images: Show at most this many images (the first ones of the batch).
        pad: Pixels between cells.

    Returns:
        The rendered :class:`ImageGrid` (``min(B, max_images)`` rows).
    """
    _check_batch(inputs, "inputs")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    n = min(inputs.shape[0], max_images)
    columns: list[tuple[str, torch.Tensor]] = [(f"input\n{_side(inputs)}", inputs)]
    for name, levels in pyramids.items():
        levels = [levels] if isinstance(levels, torch.Tensor) else list(levels)
        if not levels:
            raise ValueError(f"pyramid {name!r} has no levels")
        for k, lvl in enumerate(levels):
            _check_batch(lvl, f"pyramids[{name!r}][{k}]")
            if lvl.shape[0] < n:
                raise ValueError(f"pyramids[{name!r}][{k}] holds {lvl.shape[0]} images, need {n}")
            columns.append((f"{name}\n{_side(lvl)}", lvl))
    rows = [[col[i] for _, col in columns] for i in range(n)]
    grid = render_image_grid(rows, col_labels=[label for label, _ in columns], pad=pad,
                             upscale_to=(inputs.shape[-2], inputs.shape[-1]))
    _save(grid, path)
    return grid


def pyramid_strip(
    pyramid: Sequence[torch.Tensor],
    path: str | os.PathLike,
    upscale: bool = True,
    labels: bool = True,
    pad: int = 2,
) -> ImageGrid:
    """One image's pyramid, coarse to fine, as a single row.

    Args:
        pyramid: Levels ``(3, h_k, w_k)`` (or ``(1, 3, h_k, w_k)``), coarse to fine.
        path: Output file.
        upscale: Nearest-upscale every level to the finest level's size (else true sizes, centred).
        labels: Write each level's size above it.
        pad: Pixels between cells.

    Returns:
        The rendered :class:`ImageGrid`.
    """
    levels = list(pyramid)
    if not levels:
        raise ValueError("pyramid has no levels")
    largest = max(levels, key=lambda t: t.shape[-2] * t.shape[-1])
    col_labels = [_side(t) for t in levels] if labels else None
    grid = render_image_grid([levels], col_labels=col_labels, pad=pad,
                             upscale_to=(largest.shape[-2], largest.shape[-1]) if upscale else None)
    _save(grid, path)
    return grid


def save_samples_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    pad: int = 2,
) -> ImageGrid:
    """Generator samples in a grid of ``nrow`` images per row.

    Args:
        images: ``(B, 3, H, W)`` samples in ``[-1, 1]``.
        path: Output file.
        nrow: Images per row.
        labels: Optional one label per row (e.g. the class of a class-conditional row).
        pad: Pixels between cells.

    Returns:
        The rendered :class:`ImageGrid` (``ceil(B / nrow)`` rows).
    """
    _check_batch(images, "images")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = [list(images[i:i + nrow]) for i in range(0, images.shape[0], nrow)]
    grid = render_image_grid(rows, row_labels=labels, pad=pad)
    _save(grid, path)
    return grid
