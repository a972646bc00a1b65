r"""How a training run went, from its workdir's metrics.jsonl: text and curves.

python -m landmark_jax.training_summary --workdir=DIR [--curves=curves.png]

prints the first and last loss, the validation metrics and the checkpoints;
--curves also draws the curves (loss, accuracy, retrieval mAP, learning rate
against the step) to a PNG, the picture the Colab notebook shows inline.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from absl import flags
from PIL import Image, ImageDraw, ImageFont

from landmark_jax.runtime import entry_point_errors, file_io
from landmark_jax.workdir import checkpointing, metric_writer
from landmark_jax.workdir.metric_writer import METRICS_FILE

# (panel title, the metrics.jsonl keys it plots); panels without data are left out.
PANELS = (
    ("loss", ("loss", "val_loss")),
    ("accuracy", ("accuracy", "val_accuracy")),
    ("retrieval mAP@100", ("val_map@100",)),
    ("learning rate", ("learning_rate",)),
)
SERIES_COLORS = ((31, 119, 180), (255, 127, 14))
PANEL_SIZE = (360, 220)
# The plot area inside a panel: left, top, right, bottom margins (axis labels).
PLOT_MARGINS = (60, 22, 12, 26)
COLUMNS = 2
MAX_DOTS = 30  # a series with more points is drawn as a line alone


def read_metrics(workdir: str) -> list[dict]:
    """The rows of a workdir's metrics.jsonl, in order.

    Raises:
      FileNotFoundError: the workdir has no metrics.jsonl.
      ValueError: it is empty.
    """
    path = file_io.join(workdir, METRICS_FILE)
    if not file_io.exists(path):
        raise FileNotFoundError(f"{path} not found: has a run been started in {workdir}?")
    rows = metric_writer.read_rows(workdir)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def summarize(workdir: str) -> str:
    """First and last logged loss, the eval metrics, and the checkpoints.

    Raises:
      FileNotFoundError: the workdir has no metrics.jsonl.
    """
    rows = read_metrics(workdir)
    first, last = rows[0], rows[-1]
    lines = [
        f"{workdir}: {len(rows)} log steps up to step {last['step']}",
        f"  train loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
        f"(step {last['step']})",
    ]
    for row in rows:
        evals = {k: v for k, v in row.items() if k.startswith(("val_", "train_", "eval_"))}
        if evals:
            lines.append(
                f"  step {row['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items())
            )
    steps = checkpointing.saved_steps(workdir)
    if steps:
        lines.append(f"  checkpoints at steps {steps}")
    return "\n".join(lines)


def plot_position(
    step: float, value: float, steps: tuple[float, float], values: tuple[float, float], box
) -> tuple[float, float]:
    """Where (step, value) lands in a plot box (left, top, right, bottom): the
    step range spans the width, the value range the height (higher is up)."""
    left, top, right, bottom = box
    (s0, s1), (v0, v1) = steps, values
    x = left + (right - left) * ((step - s0) / (s1 - s0) if s1 > s0 else 0.5)
    y = bottom - (bottom - top) * ((value - v0) / (v1 - v0) if v1 > v0 else 0.5)
    return x, y


def _draw_panel(draw, font, origin, title, series) -> None:
    """One panel: title, frame, min/max labels and a polyline per series."""
    ox, oy = origin
    ml, mt, mr, mb = PLOT_MARGINS
    box = (ox + ml, oy + mt, ox + PANEL_SIZE[0] - mr, oy + PANEL_SIZE[1] - mb)
    points = [p for _, pts in series for p in pts]
    steps = (min(p[0] for p in points), max(p[0] for p in points))
    values = (min(p[1] for p in points), max(p[1] for p in points))
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((ox + 4, oy + 4), title, fill=(0, 0, 0), font=font)
    x = max(ox + ml, ox + 4 + int(draw.textlength(title, font=font)) + 16)
    for (name, _), color in zip(series, SERIES_COLORS, strict=False):
        draw.text((x, oy + 4), name, fill=color, font=font)
        x += int(draw.textlength(name, font=font)) + 12
    draw.text((ox + 2, box[1]), f"{values[1]:.3g}", fill=(80, 80, 80), font=font)
    draw.text((ox + 2, box[3] - 10), f"{values[0]:.3g}", fill=(80, 80, 80), font=font)
    draw.text((box[0], box[3] + 4), f"step {steps[0]:g}", fill=(80, 80, 80), font=font)
    label = f"{steps[1]:g}"
    draw.text((box[2] - draw.textlength(label, font=font), box[3] + 4), label, fill=(80, 80, 80))
    for (_, pts), color in zip(series, SERIES_COLORS, strict=False):
        xy = [plot_position(s, v, steps, values, box) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy if len(xy) <= MAX_DOTS else ():
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)


def render_curves(workdir: str) -> Image.Image:
    """The run's curves against the step, one panel per entry of PANELS that
    has finite values (a non-finite loss is left out of its curve).

    Raises:
      FileNotFoundError, ValueError: as read_metrics.
    """
    rows = read_metrics(workdir)
    panels = []
    for title, keys in PANELS:
        series = []
        for key in keys:
            pts = [
                (float(r["step"]), float(r[key]))
                for r in rows
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
            ]
            if pts:
                series.append((key, pts))
        if series:
            panels.append((title, series))
    if not panels:
        raise ValueError(f"{workdir}: metrics.jsonl has none of the keys {[k for _, k in PANELS]}")
    num_rows = -(-len(panels) // COLUMNS)
    width = PANEL_SIZE[0] * min(COLUMNS, len(panels))
    image = Image.new("RGB", (width, PANEL_SIZE[1] * num_rows), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, (title, series) in enumerate(panels):
        origin = (PANEL_SIZE[0] * (i % COLUMNS), PANEL_SIZE[1] * (i // COLUMNS))
        _draw_panel(draw, font, origin, title, series)
    return image


def curves_png(workdir: str) -> bytes:
    """render_curves as PNG bytes (for IPython.display.Image or a file)."""
    buffer = io.BytesIO()
    render_curves(workdir).save(buffer, format="PNG")
    return buffer.getvalue()


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_string("workdir", None, "The training run's workdir.")
    flags.DEFINE_string("curves", None, "Also draw the training curves to this PNG.")
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    entry_point_errors.refuse_arguments(argv)
    print(summarize(FLAGS.workdir))
    if FLAGS.curves:
        file_io.write_bytes(FLAGS.curves, curves_png(FLAGS.workdir))
        print(f"curves: {FLAGS.curves}")


if __name__ == "__main__":
    define_flags()
    entry_point_errors.run(main)
