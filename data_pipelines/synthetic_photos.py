"""Randomised photographs of synthetic scenes, and the worker job that writes them.

A photograph composites a scene's layer over a sky and ground drawn for that
photograph, then applies a random viewpoint (perspective warp, rotation, zoom
and crop), foreground occluders, blur, lighting (brightness, contrast, gamma,
colour cast), noise and a random JPEG quality. `render_job` is the unit of
work of make_demo_dataset's worker processes: a module without flags, so any
process start method can unpickle it.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipelines import synthetic_scenes
from data_pipelines.synthetic_scenes import SCENE_SIZE
from landmark_jax.runtime import file_io

# Rendering the warp at twice the output size and box-averaging it down avoids
# the aliasing of a plain bilinear warp when the window is much larger than
# the output.
_SUPERSAMPLE = 2


def _perspective_coefficients(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients that map output corners `dst` to input corners `src`."""
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -x * u, -y * u])
        rows.append([0, 0, 0, x, y, 1, -x * v, -y * v])
        rhs.extend([u, v])
    return tuple(np.linalg.solve(np.array(rows, np.float64), np.array(rhs, np.float64)))


def _view_window(rng, box, out_w: int, out_h: int, difficulty: float) -> np.ndarray:
    """The four canvas corners (tl, tr, br, bl) a photograph sees."""
    bx0, by0, bx1, by1 = box
    box_w, box_h = max(bx1 - bx0, 8), max(by1 - by0, 8)
    # Zoom: from a detail of the landmark to a wide shot with surroundings.
    zoom = rng.uniform(0.6 - 0.15 * difficulty, 1.5)
    win_w = max(box_w, box_h * out_w / out_h) * zoom
    win_h = win_w * out_h / out_w
    scale = min(1.0, (SCENE_SIZE - 1) / win_w, (SCENE_SIZE - 1) / win_h)
    win_w, win_h = win_w * scale, win_h * scale
    cx = (bx0 + bx1) / 2 + rng.uniform(-0.25, 0.25) * difficulty * win_w
    cy = (by0 + by1) / 2 + rng.uniform(-0.2, 0.2) * difficulty * win_h
    cx = float(np.clip(cx, win_w / 2, SCENE_SIZE - 1 - win_w / 2))
    cy = float(np.clip(cy, win_h / 2, SCENE_SIZE - 1 - win_h / 2))
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * [win_w / 2, win_h / 2]
    # Yaw and pitch squeeze one side of the window, as a camera off-axis does.
    yaw = rng.uniform(-0.2, 0.2) * difficulty
    pitch = rng.uniform(-0.1, 0.15) * difficulty
    half[:, 1] *= 1 + yaw * np.sign(half[:, 0])
    half[:, 0] *= 1 + pitch * -np.sign(half[:, 1])
    angle = math.radians(float(np.clip(rng.normal(0, 4), -10, 10)) * difficulty)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = half @ rotation.T + [cx, cy]
    corners += rng.normal(0, 0.03 * difficulty, size=(4, 2)) * [win_w, win_h]
    return np.clip(corners, 0, SCENE_SIZE - 1)


def _add_occluders(image: Image.Image, rng: np.random.Generator, difficulty: float) -> None:
    """Foreground objects (people, cars, signs, branches) in front of the landmark."""
    count = int(rng.poisson(0.9 * difficulty))
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(count):
        w = width * rng.uniform(0.08, 0.3)
        h = height * rng.uniform(0.1, 0.45)
        x = rng.uniform(-w / 2, width - w / 2)
        y = rng.uniform(height * 0.3, height - h / 2)  # mostly in the lower half, like passers-by
        colour = synthetic_scenes.hsv(rng.uniform(), rng.uniform(0, 0.9), rng.uniform(0.05, 0.9))
        if rng.uniform() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.rectangle((x, y, x + w, y + h), fill=colour)


def _relight(pixels: np.ndarray, rng: np.random.Generator, difficulty: float) -> np.ndarray:
    """Exposure, contrast, gamma, white balance and sensor noise of one photograph."""
    x = pixels.astype(np.float32) / 255.0
    cast = 1.0 + rng.uniform(-0.2, 0.2, size=3) * difficulty
    x = x * cast * rng.uniform(0.65, 1.3)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.65, 1.3) + mean
    x = np.clip(x, 0, 1) ** rng.uniform(0.75, 1.35)
    if rng.uniform() < 0.08:
        x = np.broadcast_to(x @ np.array([0.299, 0.587, 0.114], np.float32)[:, None], x.shape)
    x = x * 255.0 + rng.normal(0, rng.uniform(0, 6), size=x.shape)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def photograph(
    scene: synthetic_scenes.Scene,
    rng: np.random.Generator,
    max_side: int,
    difficulty: float = 1.0,
) -> Image.Image:
    """Takes one random photograph of a scene.

    Args:
      scene: what to photograph.
      rng: the photograph's own generator.
      max_side: the longest side of the photograph; sides vary between 3/4 of it
        and all of it, and between landscape, portrait and square.
      difficulty: scales the viewpoint, crop, colour-cast and occlusion
        ranges; 1 for ordinary photographs, larger for off-topic shots.

    Returns:
      An RGB image.
    """
    long_side = int(rng.integers(max(8, (3 * max_side) // 4), max_side + 1))
    short_side = max(8, int(round(long_side * rng.uniform(0.62, 1.0))))
    out_w, out_h = (long_side, short_side) if rng.uniform() < 0.7 else (short_side, long_side)
    canvas = Image.fromarray(synthetic_scenes.draw_background(rng, scene.horizon))
    canvas.paste(scene.layer, (0, 0), scene.layer)
    src = _view_window(rng, scene.box, out_w, out_h, difficulty)
    big_w, big_h = out_w * _SUPERSAMPLE, out_h * _SUPERSAMPLE
    dst = np.array([[0, 0], [big_w, 0], [big_w, big_h], [0, big_h]], np.float64)
    warped = canvas.transform(
        (big_w, big_h),
        Image.Transform.PERSPECTIVE,
        _perspective_coefficients(dst, src),
        Image.Resampling.BILINEAR,
    ).reduce(_SUPERSAMPLE)
    _add_occluders(warped, rng, difficulty)
    if rng.uniform() < 0.3:
        warped = warped.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return Image.fromarray(_relight(np.asarray(warped), rng, difficulty))


def encode_jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG bytes at a random quality, like photos from many cameras.

    Args:
      image: an RGB image.
      rng: draws the quality (70-95).

    Returns:
      Baseline JPEG bytes; identical for identical inputs.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class PhotoJob:
    """Photographs of one scene, rendered together so the scene is drawn once.

    Attributes:
      scene_seed: entropy of the scene's generator (`np.random.default_rng`).
      is_landmark: draw the scene with `draw_landmark`, else `draw_distractor`.
      photos: (output path, photo generator entropy, difficulty) per photo.
      max_side: longest side of every photograph.
    """

    scene_seed: tuple[int, ...]
    is_landmark: bool
    photos: tuple[tuple[str, tuple[int, ...], float], ...]
    max_side: int


def render_job(job: PhotoJob) -> int:
    """Draws a job's scene and writes each of its photographs as a JPEG file.

    A top-level function of this module (which defines no flags) so that
    worker processes of any start method can unpickle it.

    Args:
      job: what to render and where to write it; folders are created.

    Returns:
      The number of files written.
    """
    scene_rng = np.random.default_rng(job.scene_seed)
    scene = (
        synthetic_scenes.draw_landmark(scene_rng)
        if job.is_landmark
        else synthetic_scenes.draw_distractor(scene_rng)
    )
    for path, photo_seed, difficulty in job.photos:
        rng = np.random.default_rng(photo_seed)
        data = encode_jpeg(photograph(scene, rng, job.max_side, difficulty), rng)
        file_io.write_bytes(path, data)  # creates the folders
    return len(job.photos)
