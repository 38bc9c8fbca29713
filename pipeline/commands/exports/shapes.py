"""An object's geometry as the file formats want it: its box inside the image, its mask, and
its mask's outline as one polygon.

Outlines come from OpenCV's border following (`cv2.findContours`), the tracer the readers of
these formats rasterise with (`cv2.fillPoly`, which YOLO tools and supervision use): its
vertices are pixel indices, and filling them back gives the mask's pixels again, boundary
included. OpenCV is an optional extra (`pip install 'gemini-vision-pipeline[exports]'`),
imported only when a mask is traced.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.commands.exports.dataset import ExportImage
from pipeline.masks import rle_decode
from pipeline.output.stores import MissingExtra


def pixel_box(obj: dict[str, Any], image: ExportImage) -> tuple[float, float, float, float] | None:
    """The object's box (x0, y0, x1, y1) in pixels, clipped to the image; None when it has no
    box or nothing of it is inside."""
    bbox = obj.get("bbox")
    if not bbox or len(bbox) != 4:
        return None
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, x1 = max(0.0, x0), min(float(image.width), x1)
    y0, y1 = max(0.0, y0), min(float(image.height), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def mask_of(obj: dict[str, Any], image: ExportImage) -> np.ndarray | None:
    """The object's full-image mask; None when it has none, a corrupt one, one of another
    size than the image's, or an empty one."""
    rle = obj.get("mask")
    if not rle or rle.get("counts") is None:
        return None
    try:
        mask = rle_decode(rle)
    except (ValueError, KeyError, TypeError):
        return None
    if mask.shape != (image.height, image.width) or not mask.any():
        return None
    return mask


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The outline of the mask's largest part as an (N, 2) array of [x, y] pixel indices;
    None when that part has fewer than 3 corners (a line or a dot: no area to outline).
    Formats that hold one polygon an object lose the smaller parts and the holes."""
    cv2 = _opencv()
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return None
    largest = max(contours, key=lambda contour: (cv2.contourArea(contour), len(contour)))
    points = largest.reshape(-1, 2)
    return points if len(points) >= 3 else None


def _opencv() -> Any:
    try:
        import cv2  # an optional extra: only mask outlines need it
    except ImportError:
        raise MissingExtra(
            "tracing masks into polygons needs OpenCV: "
            "pip install 'gemini-vision-pipeline[exports]'"
        ) from None
    return cv2
