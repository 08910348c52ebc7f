"""Reports of a ``zqhero eval`` run: the console table (rich if installed, else plain text), JSON, markdown, PNG.

All of them are made from the dict :func:`zqhero_fx.eval.run.evaluate` returns, so a saved ``results.json`` can be
re-rendered later (``render_table(json.load(open(...)))``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["columns", "table_rows", "render_table", "to_markdown", "write_json", "write_markdown",
           "accuracy_vs_speed_figure", "write_plot", "write_all"]


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt_metric(entry: dict | None, spec: dict) -> str:
    if not entry or not _num(entry.get("value")):
        return "—"
    scale, digits = (100.0, 2) if spec.get("percent") else (1.0, 4)
    text = f"{entry['value'] * scale:.{digits}f}"
    if _num(entry.get("stderr")):
        text += f" ±{entry['stderr'] * scale:.{digits}f}"
    elif entry.get("ci") and all(_num(v) for v in entry["ci"]):
        lo, hi = entry["ci"]
        text += f" [{lo * scale:.{digits - 2}f}, {hi * scale:.{digits - 2}f}]"
    return text


def _fmt_delta(entry: dict | None, spec: dict) -> str:
    if not entry or not _num(entry.get("delta")):
        return "—"
    scale, digits = (100.0, 2) if spec.get("percent") else (1.0, 4)
    text = f"{entry['delta'] * scale:+.{digits}f}"
    return text if text.strip("+-0.") else text.replace("-", "+")  # no "-0.0000"


def _fmt(x, digits: int, suffix: str = "") -> str:
    return f"{x:.{digits}f}{suffix}" if _num(x) else "—"


def _pair(a, b, digits: int, suffix: str) -> str:
    text = _fmt(a, digits, suffix)
    return f"{text} ({_fmt(b, digits, suffix)})" if _num(b) else text


def columns(report: dict) -> list[str]:
    """Column headers: mode, each task metric and its change against FP32, agreement, cosines, latency, size."""
    cols = ["mode"]
    for spec in report["metrics"]:
        unit = " (%)" if spec.get("percent") else ""
        cols += [f"{spec['label']}{unit}", f"Δ {spec['label']}"]
    shape = report.get("timing", {}).get("batch_shape")
    lat = f"latency ms {shape[0]}x{shape[1]} median (min)" if shape else "latency ms median (min)"
    return cols + ["agreement", "cos mean", "cos min", lat, "speed-up median (min)", "size MB"]


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for row in report["rows"]:
        cells = [row["mode"]]
        for spec in report["metrics"]:
            entry = row["metrics"].get(spec["key"])
            cells += [_fmt_metric(entry, spec), _fmt_delta(entry, spec)]
        cells += [_fmt(row.get("agreement"), 4), _fmt(row.get("cos_mean"), 5), _fmt(row.get("cos_min"), 5),
                  _pair(row.get("latency_ms"), row.get("latency_min_ms"), 1, ""),
                  _pair(row.get("speedup"), row.get("speedup_min"), 2, "x"), _fmt(row.get("size_mb"), 1)]
        out.append(cells)
    return out


def _title(report: dict) -> str:
    m = report.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('torch_threads', '?')} threads"
    return f"zqhero eval — {report['model']} — {m.get('device', '?')} ({where})"


def _notes(report: dict) -> list[str]:
    notes = ["± is the standard error (binomial); [a, b] a 95% bootstrap interval"
             + (" (Lee: resampling documents)" if report.get("suite") == "default" else "") + ".",
             "Δ: difference to fp32; agreement: predictions equal to fp32's; cos: cosine of the mean-pooled "
             "embedding to fp32's, per text.",
             "latency: median (and minimum) over timed batches on this machine, modes interleaved; speed-up = fp32 "
             "latency / latency; size: bytes of the tensors the model reads (weights, scales, tables)."]
    return notes


def render_table(report: dict, file=None) -> str:
    """Print the table (rich if installed) and return its plain-text form."""
    file = file or sys.stdout
    cols, rows = columns(report), table_rows(report)
    plain = _plain(cols, rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(_title(report), file=file)
        print(plain, file=file)
        for n in _notes(report):
            print("  " + n, file=file)
        return plain
    import textwrap

    from rich.markup import escape

    table = Table(title=escape(_title(report)), caption=escape("\n".join(_notes(report))), caption_justify="left")
    cells = [max((len(r[i]) for r in rows), default=0) for i in range(len(cols))]
    heads = [textwrap.fill(c, width=max(cells[i], 8), break_long_words=False) for i, c in enumerate(cols)]
    for i, h in enumerate(heads):
        table.add_column(escape(h), justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(escape(v) for v in r))
    widths = [max(cells[i], *(len(line) for line in h.splitlines())) for i, h in enumerate(heads)]
    Console(file=file, width=max(100, sum(widths) + 3 * len(cols) + 1), highlight=False).print(table)
    return plain


def _plain(cols: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, sep, *body])


def to_markdown(report: dict) -> str:
    cols, rows = columns(report), table_rows(report)
    head = "| " + " | ".join(cols) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(cols))) + "|"
    body = ["| " + " | ".join(r) + " |" for r in rows]
    m = report.get("machine", {})
    cal = report.get("calibration", {})
    lines = [f"## {_title(report)}", "", head, align, *body, ""]
    lines += [f"- {n}" for n in _notes(report)]
    lines += [
        f"- command: `{report.get('command') or 'zqhero eval'}`",
        f"- date: {report.get('date')}; device: {m.get('device')}; CPU: {m.get('cpu')} ({m.get('cpu_count')} cores, "
        f"{m.get('torch_threads')} torch threads); torch {m.get('torch')}, transformers {m.get('transformers')}",
        f"- calibration: {cal.get('batches')} batches, {cal.get('sequences')} sequences up to {cal.get('max_seq')} "
        f"tokens, from {cal.get('split')}",
        f"- total runtime: {report.get('runtime_s', float('nan')):.0f} s",
        "",
    ]
    return "\n".join(lines)


def _jsonable(x: Any):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    return path


def write_markdown(report: dict, path: Path) -> Path:
    path.write_text(to_markdown(report))
    return path


def accuracy_vs_speed_figure(report: dict):
    """Accuracy against speed: one panel per task metric, one point per mode (error bars: the uncertainty), each
    point labelled with its mode where the label overlaps no other label or point (`_place_labels`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    specs = [s for s in report["metrics"] if s.get("main") or report.get("suite") == "default"]
    specs = specs or [{"key": None, "label": "cosine to fp32 (mean)", "percent": False}]
    fig, axes = plt.subplots(1, len(specs), figsize=(4.6 * len(specs), 3.8), squeeze=False, dpi=PLOT_DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels_per_axis = []
    for ax, spec in zip(axes[0], specs):
        scale = 100.0 if spec.get("percent") else 1.0
        labels = []
        for i, row in enumerate(report["rows"]):
            x = row.get("speedup")
            if spec["key"] is None:
                y, err = row.get("cos_mean") if row["mode"] != report["baseline"] else 1.0, None
            else:
                entry = row["metrics"].get(spec["key"], {})
                y = entry.get("value")
                if _num(entry.get("stderr")):
                    err = 1.959964 * entry["stderr"] * scale  # 95%, like the bootstrap intervals
                elif entry.get("ci") and all(_num(v) for v in entry["ci"]):
                    err = np.array([[y - entry["ci"][0]], [entry["ci"][1] - y]]) * scale
                else:
                    err = None
            if not (_num(x) and _num(y)):
                continue
            y = y * scale if spec["key"] else y
            colour = colours[i % len(colours)]
            ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3, color=colour, label=row["mode"])
            labels.append((x, y, row["mode"], colour))
        labels_per_axis.append(labels)
        ax.axvline(1.0, color="#999999", lw=0.8, ls="--")
        ax.set_xlabel("speed-up vs fp32 (median batch latency)")
        ax.set_ylabel(spec["label"] + (" (%)" if spec.get("percent") else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    m = report.get("machine", {})
    fig.suptitle(f"{report['model']} — {m.get('device')} ({m.get('gpu') or m.get('cpu')}); error bars: 95% "
                 "intervals", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()  # settles the layout and axis limits: the labels are placed in their final pixels
    for ax, labels in zip(axes[0], labels_per_axis):
        _place_labels(ax, labels)
    return fig


PLOT_DPI = 120  # the figure is laid out at the resolution it is saved at, so the labels' pixel boxes are the saved ones
LABEL_FONTSIZE = 9
LABEL_GAP = 6.0  # points between a marker's centre and its label, sideways


def _label_candidates(line_height: float):
    """(offset in points, ha, va) to try for a label, nearest first: beside the marker on each of its four sides,
    then stacked one line further up or down at a time."""
    for dy_sign in (1, -1):
        for dx, ha in ((LABEL_GAP, "left"), (-LABEL_GAP, "right")):
            yield (dx, dy_sign * 2.0), ha, "bottom" if dy_sign > 0 else "top"
    for step in range(1, 9):
        for dy_sign in (1, -1):
            for dx, ha in ((LABEL_GAP, "left"), (-LABEL_GAP, "right")):
                yield (dx, dy_sign * (2.0 + step * line_height)), ha, "bottom" if dy_sign > 0 else "top"


def _overlap_area(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _outside_area(box, frame) -> float:
    return box.width * box.height - _overlap_area(box, frame)


def _place_labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Annotate each (x, y, text, colour) at the first candidate position (`_label_candidates`) whose box overlaps no
    label placed before it and no marker and stays inside the panel, measured in the figure's pixels; where every
    candidate fails, the one with the least overlap and overhang. Deterministic: labels go in order of x, then y."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    pixels_per_point = ax.figure.dpi / 72.0
    radius = 4.0 * pixels_per_point  # the default 6-point marker, with a point of margin
    obstacles = []
    for x, y, _, _ in labels:
        px, py = ax.transData.transform((x, y))
        obstacles.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
    line_height = LABEL_FONTSIZE * 1.3
    for x, y, text, colour in sorted(labels, key=lambda label: (label[0], label[1])):
        best, best_box, best_overlap = None, None, math.inf
        for offset, ha, va in _label_candidates(line_height):
            annotation = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, ha=ha, va=va,
                                     fontsize=LABEL_FONTSIZE, color=colour)
            box = annotation.get_window_extent(renderer)
            # Outside the panel a label may run into the next panel's tick labels: that counts as overlap too.
            overlap = sum(_overlap_area(box, other) for other in obstacles) + _outside_area(box, ax.bbox)
            if overlap < best_overlap:
                if best is not None:
                    best.remove()
                best, best_box, best_overlap = annotation, box, overlap
            else:
                annotation.remove()
            if overlap == 0:
                break
        obstacles.append(best_box)


def write_plot(report: dict, path: Path) -> Path:
    """`accuracy_vs_speed_figure` as a PNG; the canvas grows to labels placed outside the axes."""
    import matplotlib.pyplot as plt

    fig = accuracy_vs_speed_figure(report)
    fig.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def write_all(report: dict, out_dir: Path | str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json(report, out / "results.json"),
        "markdown": write_markdown(report, out / "results.md"),
        "plot": write_plot(report, out / "accuracy_vs_speed.png"),
    }
