"""Draw one sampling run's ``RunStats`` as a plot image (Pillow drawing only, no plotting library).

Layout, top to bottom: a title with the model rows spent against plain CFG; a panel of model rows
per evaluation (rows saved vs CFG stacked on top) with the noise level sigma overlaid; one panel
per technique signal (numeric signals only; a list signal, e.g. one value per sample or concept,
draws one curve per element, or its mean beyond ``MAX_CURVES`` elements); the step axis.  Every
decision (``RunStats.mark``) is a vertical line in ``MARKER_COLOR`` through all panels, labelled
at the top; nothing else is drawn in that colour, so a reader (or a test) can find the markers.

Evaluations sit at their schedule position (``RunStats.position``), so a second-order sampler's
extra evaluations fall between (or on) step ticks.
"""
from PIL import Image, ImageDraw, ImageFont

from .run_record import RunStats

WIDTH, HEIGHT = 768, 512
MARKER_COLOR = (214, 39, 40)
MAX_SIGNAL_PANELS = 3
MAX_CURVES = 6
MARKER_LABEL_CHARS = 36

BACKGROUND = (255, 255, 255)
PANEL_BACKGROUND = (248, 248, 250)
GRID = (222, 222, 228)
TEXT = (35, 35, 40)
MUTED_TEXT = (110, 110, 120)
ROWS_COLOR = (70, 110, 190)
SAVED_COLOR = (150, 210, 150)
SIGMA_COLOR = (240, 140, 30)
PALETTE = [(31, 119, 180), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207),
           (188, 189, 34), (127, 127, 127)]

LEFT, RIGHT = 70, 64  # panel margins (the right one holds the sigma scale)
TITLE_HEIGHT, AXIS_HEIGHT, PANEL_GAP = 62, 36, 12


def _font(size: int):
    return ImageFont.load_default(size=size)


def _format(value: float) -> str:
    return f"{value:.3g}"


def _shorten(label: str, limit: int) -> str:
    return label if len(label) <= limit else label[:limit - 3] + "..."


def _numbers(value) -> list[float | None] | None:
    """A signal value as a list of floats, None for elements not measured at this evaluation (e.g.
    a sample that no longer computes the signal); None when the value is not numeric at all."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(v is None or isinstance(v, (int, float)) for v in values) or all(v is None for v in values):
        return None
    return [None if v is None else float(v) for v in values]


def signal_curves(run: RunStats) -> dict[str, list[tuple[str, list[tuple[int, float]]]]]:
    """{signal name: [(curve label, [(evaluation index, value)])]} for the numeric signals, in
    the order they first appear."""
    columns: dict[str, list[tuple[int, list[float | None]]]] = {}
    for index, evaluation in enumerate(run.evaluations):
        for name, value in evaluation.signals.items():
            numbers = _numbers(value)
            if numbers is not None:
                columns.setdefault(name, []).append((index, numbers))
    curves = {}
    for name, points in columns.items():
        width = max(len(numbers) for _, numbers in points)
        if width == 1:
            curves[name] = [(name, [(i, numbers[0]) for i, numbers in points])]
        elif width <= MAX_CURVES:
            curves[name] = [(f"{name}[{k}]", [(i, numbers[k]) for i, numbers in points
                                              if k < len(numbers) and numbers[k] is not None])
                            for k in range(width)]
        else:
            means = [(i, [v for v in numbers if v is not None]) for i, numbers in points]
            curves[name] = [(f"{name} (mean of {width})", [(i, sum(v) / len(v)) for i, v in means])]
    return curves


class _Frame:
    """Maps schedule positions and values to pixels inside one panel box."""

    def __init__(self, box, steps: int, low: float, high: float):
        self.left, self.top, self.right, self.bottom = box
        self.steps, self.low, self.high = max(steps, 1), low, high

    def x(self, position: float) -> float:
        return self.left + (position + 0.5) / self.steps * (self.right - self.left)

    def y(self, value: float) -> float:
        span = self.high - self.low or 1.0
        return self.bottom - (value - self.low) / span * (self.bottom - self.top)


def _legend(draw, x, y, entries, font):
    width = sum(28 + draw.textlength(label, font=font) for label, _ in entries)
    draw.rectangle((x - 4, y, x + width - 10, y + 16), fill=BACKGROUND)
    for label, color in entries:
        draw.rectangle((x, y + 3, x + 10, y + 13), fill=color)
        draw.text((x + 14, y), label, fill=TEXT, font=font)
        x += 14 + draw.textlength(label, font=font) + 14


def _y_labels(draw, frame, values, font, color=MUTED_TEXT, right=False):
    for value in values:
        y = frame.y(value)
        draw.line((frame.left, y, frame.right, y), fill=GRID)
        label = _format(value)
        x = frame.right + 4 if right else frame.left - 6 - draw.textlength(label, font=font)
        draw.text((x, y - 6), label, fill=color, font=font)


def _rows_panel(draw, run, box, small):
    evaluations = run.evaluations
    top_rows = max(max(e.rows, e.baseline_rows or 0) for e in evaluations) or 1
    frame = _Frame(box, run.steps, 0.0, top_rows * 1.3)
    _y_labels(draw, frame, [0, top_rows], small)
    half_bar = max(1.0, 0.35 * (frame.right - frame.left) / frame.steps)
    for index, evaluation in enumerate(evaluations):
        x = frame.x(run.position(index))
        if evaluation.baseline_rows is not None and evaluation.baseline_rows > evaluation.rows:
            draw.rectangle((x - half_bar, frame.y(evaluation.baseline_rows), x + half_bar, frame.y(0)),
                           fill=SAVED_COLOR)
        draw.rectangle((x - half_bar, frame.y(evaluation.rows), x + half_bar, frame.y(0)), fill=ROWS_COLOR)
    sigma_max = max(e.sigma for e in evaluations) or 1.0
    sigma_frame = _Frame(box, run.steps, 0.0, sigma_max * 1.3)
    points = [(sigma_frame.x(run.position(i)), sigma_frame.y(e.sigma)) for i, e in enumerate(evaluations)]
    if len(points) > 1:
        draw.line(points, fill=SIGMA_COLOR, width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=SIGMA_COLOR)
    draw.text((frame.right + 4, sigma_frame.y(sigma_max) - 6), _format(sigma_max), fill=SIGMA_COLOR, font=small)
    _legend(draw, frame.left + 6, frame.top + 4, [("model rows", ROWS_COLOR), ("saved vs CFG", SAVED_COLOR),
                                                  ("noise level sigma", SIGMA_COLOR)], small)


def _signal_panel(draw, run, box, name, curves, small):
    values = [v for _, points in curves for _, v in points]
    low, high = min(values), max(values)
    pad = (high - low) * 0.25 or max(abs(high) * 0.1, 0.5)
    frame = _Frame(box, run.steps, low - pad, high + pad)
    _y_labels(draw, frame, [low, high] if high != low else [low], small)
    legend = []
    for number, (label, points) in enumerate(curves):
        color = PALETTE[number % len(PALETTE)]
        xy = {i: (frame.x(run.position(i)), frame.y(v)) for i, v in points}
        for i, point in xy.items():
            if i + 1 in xy:  # no line across evaluations where the signal was not measured
                draw.line((point, xy[i + 1]), fill=color, width=2)
            draw.ellipse((point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2), fill=color)
        legend.append((label, color))
    _legend(draw, frame.left + 6, frame.top + 4, legend, small)


def _step_axis(draw, frame, y, small):
    steps = frame.steps
    every = max(1, -(-steps // 10))
    ticks = sorted({1, steps, *range(every, steps + 1, every)})
    for step in ticks:
        x = frame.x(step - 1)
        draw.line((x, y, x, y + 4), fill=MUTED_TEXT)
        label = str(step)
        draw.text((x - draw.textlength(label, font=small) / 2, y + 6), label, fill=MUTED_TEXT, font=small)
    draw.text((frame.left - 36, y + 6), "step", fill=MUTED_TEXT, font=small)


def _markers(draw, run, frame, top, bottom, small):
    """Dashed lines at the decisions; labels go on one of two rows above the panels, left out where
    they would overlap an earlier one."""
    taken = [[], []]
    for index, label in run.events:
        x = frame.x(run.position(index))
        for y in range(int(top), int(bottom), 8):
            draw.line((x, y, x, min(y + 5, bottom)), fill=MARKER_COLOR, width=2)
        draw.polygon([(x - 6, top - 9), (x + 6, top - 9), (x, top - 1)], fill=MARKER_COLOR)
        text = f"{_shorten(label, MARKER_LABEL_CHARS)} (step {run.step_of(index)})"
        width = draw.textlength(text, font=small)
        left = min(x + 8, frame.right - width)
        for row, spans in enumerate(taken):
            if all(left > end + 6 or left + width < start - 6 for start, end in spans):
                spans.append((left, left + width))
                draw.text((left, top - 13 - 13 * row), text, fill=MARKER_COLOR, font=small)
                break


def title(run: RunStats) -> str:
    text = f"{run.technique}: {run.rows} model rows vs {run.baseline_rows} for plain CFG"
    if run.baseline_rows:
        share = 100.0 * run.rows_saved / run.baseline_rows
        text += f" ({run.rows_saved} saved, {share:.0f}%)" if run.rows_saved >= 0 else \
            f" ({-run.rows_saved} extra, {-share:.0f}%)"
    return text


def plot_run(run: RunStats, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    """The run's plot as an RGB image of ``size``."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    big, small = _font(17), _font(12)
    draw.text((LEFT, 8), title(run), fill=TEXT, font=big)
    summary = run.summary()
    while draw.textlength(summary, font=small) > width - LEFT - 24 and len(summary) > 4:
        summary = summary[:-4] + "..."
    draw.text((LEFT, 30), summary, fill=MUTED_TEXT, font=small)
    if not run.evaluations:
        draw.text((LEFT, height // 2), "no model evaluations recorded", fill=MUTED_TEXT, font=big)
        return image
    curves = signal_curves(run)
    shown = list(curves.items())[:MAX_SIGNAL_PANELS]
    panels = 1 + max(len(shown), 1)
    top, bottom = TITLE_HEIGHT + 14, height - AXIS_HEIGHT
    panel_height = (bottom - top - PANEL_GAP * (panels - 1)) / panels
    boxes = [(LEFT, top + k * (panel_height + PANEL_GAP), width - RIGHT, top + k * (panel_height + PANEL_GAP)
              + panel_height) for k in range(panels)]
    for box in boxes:
        draw.rectangle(box, fill=PANEL_BACKGROUND)
    _rows_panel(draw, run, boxes[0], small)
    for box, (name, signal) in zip(boxes[1:], shown):
        _signal_panel(draw, run, box, name, signal, small)
    if not shown:
        draw.text((boxes[1][0] + 8, (boxes[1][1] + boxes[1][3]) / 2 - 8), "no technique signals recorded",
                  fill=MUTED_TEXT, font=small)
    if len(curves) > len(shown):
        draw.text((boxes[-1][0] + 8, boxes[-1][3] - 16), f"+{len(curves) - len(shown)} more signals not shown",
                  fill=MUTED_TEXT, font=small)
    axis_frame = _Frame(boxes[0], run.steps, 0.0, 1.0)
    _step_axis(draw, axis_frame, bottom, small)
    _markers(draw, run, axis_frame, boxes[0][1], boxes[-1][3], small)
    return image
