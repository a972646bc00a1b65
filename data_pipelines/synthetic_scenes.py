"""Procedural landmark scenes for the demo data (photographs: synthetic_photos).

A landmark is a scene: a few buildings (facades with window grids, towers,
domes, gables, spires, stepped tops, clocks, columns) standing on a horizon
line, drawn once from the landmark's own random generator onto a transparent
layer. A photograph of a scene composites that layer over a sky and ground
drawn for that photograph (weather and time of day change from photo to
photo), then applies a random viewpoint (perspective warp, rotation, zoom and
crop), lighting (brightness, contrast, gamma, colour cast), occluders in the
foreground, blur, noise and a random JPEG quality.

The sky and the lighting are drawn per photograph so that the mean colour of a
photograph says little about which landmark it shows: what identifies a
landmark is the shape and arrangement of its buildings and their textures.

Non-landmark images (distractors) come from `draw_distractor`: buildings from
an unused seed, a landscape with no buildings, or a close-up texture.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

# Scenes are drawn on a square canvas; photographs sample windows from it.
SCENE_SIZE = 256

_BUILDING_KINDS = ("facade", "tower", "hall", "house", "stepped")
_ROOFS = ("flat", "gable", "dome", "spire", "antenna")


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene layer and where its content sits on the canvas.

    Attributes:
      layer: RGBA image of size SCENE_SIZE x SCENE_SIZE; transparent where the
        photograph's own sky and ground show through.
      horizon: row of the canvas where the ground starts.
      box: (x0, y0, x1, y1) bounding box of the content, which photographs
        frame.
    """

    layer: Image.Image
    horizon: int
    box: tuple[int, int, int, int]


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _material(rng: np.random.Generator) -> tuple[int, int, int]:
    """A wall colour drawn from one distribution shared by all landmarks."""
    family = rng.integers(4)
    if family == 0:  # stone and concrete: greys and beiges
        return hsv(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.3), rng.uniform(0.45, 0.9))
    if family == 1:  # brick and terracotta
        return hsv(rng.uniform(-0.02, 0.08), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.75))
    if family == 2:  # painted walls of any hue
        return hsv(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.9))
    return hsv(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.4), rng.uniform(0.25, 0.6))  # glass


def _contrasting(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """A detail colour (windows, trims) clearly lighter or darker than `colour`."""
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    value = rng.uniform(0.05, 0.3) if luma > 110 else rng.uniform(0.75, 1.0)
    return hsv(rng.uniform(), rng.uniform(0.0, 0.5), value)


def _draw_windows(draw, rng, x0: int, y0: int, x1: int, y1: int, colour) -> None:
    """A grid of windows; its rows, columns and proportions are part of the identity."""
    width, height = x1 - x0, y1 - y0
    cols = int(rng.integers(1, max(2, width // 7)))
    rows = int(rng.integers(1, max(2, height // 9)))
    fill_x, fill_y = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    arched = rng.uniform() < 0.3
    cell_w, cell_h = width / cols, height / rows
    win_colour = _contrasting(rng, colour)
    for r in range(rows):
        for c in range(cols):
            wx0 = x0 + c * cell_w + cell_w * (1 - fill_x) / 2
            wy0 = y0 + r * cell_h + cell_h * (1 - fill_y) / 2
            wx1, wy1 = wx0 + cell_w * fill_x, wy0 + cell_h * fill_y
            if wx1 - wx0 < 1 or wy1 - wy0 < 1:
                continue
            draw.rectangle((wx0, wy0, wx1, wy1), fill=win_colour)
            if arched:
                draw.ellipse(
                    (wx0, wy0 - (wx1 - wx0) / 2, wx1, wy0 + (wx1 - wx0) / 2), fill=win_colour
                )


def _draw_roof(draw, rng, x0: int, x1: int, top: int, colour) -> int:
    """Draws a roof on a block spanning x0..x1 whose top edge is `top`; returns its top row."""
    kind = _ROOFS[rng.integers(len(_ROOFS))]
    width = x1 - x0
    roof_colour = _contrasting(rng, colour) if rng.uniform() < 0.5 else _material(rng)
    if kind == "gable":
        peak = top - int(width * rng.uniform(0.2, 0.6))
        draw.polygon([(x0 - 2, top), (x1 + 2, top), ((x0 + x1) / 2, peak)], fill=roof_colour)
        return peak
    if kind == "dome":
        radius = width * rng.uniform(0.3, 0.5)
        cx = (x0 + x1) / 2
        draw.pieslice(
            (cx - radius, top - radius, cx + radius, top + radius), 180, 360, fill=roof_colour
        )
        draw.line((cx, top - radius, cx, top - radius - 6), fill=roof_colour, width=2)
        return int(top - radius - 6)
    if kind == "spire":
        peak = top - int(width * rng.uniform(0.8, 2.0))
        cx = (x0 + x1) / 2
        half = width * rng.uniform(0.15, 0.45)
        draw.polygon([(cx - half, top), (cx + half, top), (cx, peak)], fill=roof_colour)
        return peak
    if kind == "antenna":
        cx = x0 + width * rng.uniform(0.3, 0.7)
        peak = top - int(rng.integers(8, 30))
        draw.line((cx, top, cx, peak), fill=roof_colour, width=2)
        return peak
    draw.rectangle((x0 - 2, top - 3, x1 + 2, top), fill=roof_colour)  # flat roof with a cornice
    return top - 3


def _draw_building(draw, rng, cx: float, horizon: int) -> tuple[int, int, int, int]:
    """Draws one building standing on the horizon; returns its bounding box."""
    kind = _BUILDING_KINDS[rng.integers(len(_BUILDING_KINDS))]
    if kind == "tower":
        width, height = rng.uniform(14, 34), rng.uniform(80, 150)
    elif kind == "hall":
        width, height = rng.uniform(70, 130), rng.uniform(30, 60)
    elif kind == "house":
        width, height = rng.uniform(30, 60), rng.uniform(25, 55)
    else:
        width, height = rng.uniform(40, 90), rng.uniform(50, 120)
    colour = _material(rng)
    x0, x1 = int(cx - width / 2), int(cx + width / 2)
    base = horizon + int(rng.integers(2, 8))
    top = int(base - height)
    if kind == "stepped":
        # Progressively narrower tiers, each with its own windows.
        tiers = int(rng.integers(2, 4))
        tier_h = (base - top) / tiers
        for t in range(tiers):
            inset = int(width * 0.15 * t)
            ty0, ty1 = int(base - (t + 1) * tier_h), int(base - t * tier_h)
            draw.rectangle((x0 + inset, ty0, x1 - inset, ty1), fill=colour)
            _draw_windows(draw, rng, x0 + inset + 3, ty0 + 3, x1 - inset - 3, ty1 - 3, colour)
        roof_top = _draw_roof(
            draw,
            rng,
            x0 + int(width * 0.15 * (tiers - 1)),
            x1 - int(width * 0.15 * (tiers - 1)),
            top,
            colour,
        )
    else:
        draw.rectangle((x0, top, x1, base), fill=colour)
        margin = int(rng.integers(2, 6))
        _draw_windows(draw, rng, x0 + margin, top + margin, x1 - margin, base - margin - 4, colour)
        roof_top = _draw_roof(draw, rng, x0, x1, top, colour)
    detail = rng.uniform()
    if detail < 0.25:  # a clock or rose window
        radius = max(3.0, width * rng.uniform(0.15, 0.3))
        cy = top + radius + 3
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=_contrasting(rng, colour),
            outline=_material(rng),
            width=2,
        )
    elif detail < 0.45:  # columns across the front
        n = int(rng.integers(3, 8))
        column = _contrasting(rng, colour)
        for i in range(n):
            px = x0 + (i + 0.5) * width / n
            draw.rectangle((px - 1.5, base - height * 0.45, px + 1.5, base), fill=column)
    elif detail < 0.65:  # horizontal bands
        band = _contrasting(rng, colour)
        for frac in rng.uniform(0.1, 0.9, size=int(rng.integers(1, 4))):
            y = int(top + frac * height)
            draw.rectangle((x0, y, x1, y + 2), fill=band)
    door_w = width * rng.uniform(0.12, 0.3)
    draw.rectangle(
        (cx - door_w / 2, base - min(height * 0.3, 22), cx + door_w / 2, base),
        fill=_contrasting(rng, colour),
    )
    return x0, min(roof_top, top), x1, base


def draw_landmark(rng: np.random.Generator) -> Scene:
    """Draws the buildings of one landmark.

    Args:
      rng: the landmark's own generator; the same state gives the same scene.

    Returns:
      The scene, its content a cluster of two to five buildings.
    """
    layer = Image.new("RGBA", (SCENE_SIZE, SCENE_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    horizon = int(SCENE_SIZE * rng.uniform(0.66, 0.8))
    n = int(rng.integers(2, 6))
    centres = np.sort(rng.uniform(0.25, 0.75, size=n)) * SCENE_SIZE
    # Drawn in a random order, so which building hides which varies by landmark.
    boxes = [_draw_building(draw, rng, float(cx), horizon) for cx in rng.permutation(centres)]
    x0 = max(0, min(b[0] for b in boxes))
    y0 = max(0, min(b[1] for b in boxes))
    x1 = min(SCENE_SIZE, max(b[2] for b in boxes))
    return Scene(layer, horizon, (x0, y0, x1, min(SCENE_SIZE, horizon + 12)))


def _draw_nature(rng: np.random.Generator) -> Scene:
    """Hills, trees and rocks: an outdoor photograph with no landmark in it."""
    layer = Image.new("RGBA", (SCENE_SIZE, SCENE_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    horizon = int(SCENE_SIZE * rng.uniform(0.55, 0.8))
    for _ in range(int(rng.integers(1, 4))):  # hills
        cx, r = rng.uniform(0, SCENE_SIZE), rng.uniform(40, 140)
        draw.ellipse(
            (cx - r, horizon - r * rng.uniform(0.2, 0.6), cx + r, horizon + r),
            fill=hsv(rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.6)),
        )
    for _ in range(int(rng.integers(3, 15))):  # trees and rocks
        cx, cy = rng.uniform(0, SCENE_SIZE), rng.uniform(horizon - 20, SCENE_SIZE)
        r = rng.uniform(5, 25)
        hue = rng.uniform(0.2, 0.4) if rng.uniform() < 0.7 else rng.uniform(0.05, 0.12)
        draw.ellipse(
            (cx - r, cy - 1.6 * r, cx + r, cy + r * 0.4),
            fill=hsv(hue, rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.7)),
        )
    return Scene(layer, horizon, (0, horizon - 60, SCENE_SIZE, SCENE_SIZE))


def _draw_texture(rng: np.random.Generator) -> Scene:
    """A close-up of a surface: smooth random colour fields with stripes or speckle."""
    cells = int(rng.integers(3, 12))
    field = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize((SCENE_SIZE, SCENE_SIZE), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    if rng.uniform() < 0.5:
        yy, xx = np.mgrid[0:SCENE_SIZE, 0:SCENE_SIZE]
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 24)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        pixels = pixels * (0.75 + 0.25 * stripes[..., None])
    else:
        pixels = pixels + rng.normal(0, 25, size=pixels.shape)
    rgba = np.concatenate(
        [np.clip(pixels, 0, 255), np.full((SCENE_SIZE, SCENE_SIZE, 1), 255.0)], axis=-1
    ).astype(np.uint8)
    return Scene(Image.fromarray(rgba, "RGBA"), SCENE_SIZE // 2, (0, 0, SCENE_SIZE, SCENE_SIZE))


def draw_distractor(rng: np.random.Generator) -> Scene:
    """Draws a scene that matches no landmark.

    Args:
      rng: the distractor's own generator.

    Returns:
      Buildings from a fresh generator (an unknown landmark, a hard negative),
      a landscape without buildings, or a close-up texture.
    """
    kind = rng.uniform()
    if kind < 0.35:
        return draw_landmark(rng)
    if kind < 0.75:
        return _draw_nature(rng)
    return _draw_texture(rng)


def draw_background(rng: np.random.Generator, horizon: int) -> np.ndarray:
    """This photograph's sky and ground: the weather and time of day vary per photo."""
    condition = rng.uniform()
    if condition < 0.45:  # clear day
        top = hsv(rng.uniform(0.55, 0.64), rng.uniform(0.4, 0.8), rng.uniform(0.6, 0.95))
        low = hsv(rng.uniform(0.52, 0.6), rng.uniform(0.1, 0.4), rng.uniform(0.8, 1.0))
    elif condition < 0.75:  # overcast
        grey = rng.uniform(0.5, 0.9)
        top, low = hsv(0.6, 0.05, grey), hsv(0.6, 0.03, min(1.0, grey + 0.1))
    elif condition < 0.9:  # dusk
        top = hsv(rng.uniform(0.6, 0.8), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6))
        low = hsv(rng.uniform(0.0, 0.12), rng.uniform(0.4, 0.8), rng.uniform(0.7, 1.0))
    else:  # night
        top = hsv(rng.uniform(0.6, 0.7), rng.uniform(0.3, 0.8), rng.uniform(0.02, 0.15))
        low = hsv(rng.uniform(0.6, 0.7), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.3))
    ground = np.array(_material(rng), dtype=np.float32) * rng.uniform(0.5, 1.0)
    rows = np.arange(SCENE_SIZE, dtype=np.float32)[:, None]
    t = np.clip(rows / max(horizon, 1), 0, 1)
    sky = np.array(top, np.float32) * (1 - t) + np.array(low, np.float32) * t
    # The ground darkens towards the camera, a cue shared by all landmarks.
    shade = 1.0 - 0.35 * np.clip((rows - horizon) / max(SCENE_SIZE - horizon, 1), 0, 1)
    column = np.clip(np.where(rows < horizon, sky, ground * shade), 0, 255).astype(np.uint8)
    # Uniform rows: the photograph's sensor noise comes later, at output size, which is cheaper.
    return np.ascontiguousarray(np.broadcast_to(column[:, None, :], (SCENE_SIZE, SCENE_SIZE, 3)))
