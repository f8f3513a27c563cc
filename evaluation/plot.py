"""Line plots as PNG with PIL only (ablation curves for docs/RESULTS.md; no plotting library needed)."""

from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (720, 440), by_x: bool = True, y_from_zero: bool = True) -> None:
    """One line with markers per series (name -> [(x, y), ...]), axes with ticks, a legend; saved as PNG. by_x: the
    line joins the points in order of x; False: in the order given (a path through a plane, e.g. along training).
    y_from_zero: the y axis starts at 0 (or below, for negative values); False: at the smallest y."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError("nothing to plot")
    w, h = size
    left, right, top, bottom = 60, 170, 46, 45  # title, then the y label, on rows of their own
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    y0 = min(0.0, y0) if y_from_zero else y0
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 6), title, fill="black")
    draw.line([to_px(x0, y0), to_px(x1, y0)], fill="black")
    draw.line([to_px(x0, y0), to_px(x0, y1)], fill="black")
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = to_px(xv, y0)
        _, py = to_px(x0, yv)
        draw.line([(px, h - bottom), (px, h - bottom + 4)], fill="black")
        draw.text((px - 10, h - bottom + 6), f"{xv:.4g}", fill="black")
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((4, py - 6), f"{yv:.3g}", fill="black")
    draw.text(((w - right) // 2, h - 16), xlabel, fill="black")
    draw.text((4, top - 18), ylabel, fill="black")
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        xy = [to_px(x, y) for x, y in (sorted(pts) if by_x else pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        ly = top + 16 * k
        draw.line([(w - right + 10, ly + 6), (w - right + 30, ly + 6)], fill=color, width=3)
        draw.text((w - right + 36, ly), name, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
