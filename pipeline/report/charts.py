"""The report's pictures: matplotlib figures saved as SVG and inlined in the page.

SVG keeps the page one file that needs no network and no JavaScript, scales and prints sharply, and keeps text
as text (``svg.fonttype: none``). Output is deterministic (no date, a fixed hash salt per figure), so a version
folder that holds the report is byte-identical when export runs again on the same inputs. Matplotlib is used
through ``matplotlib.figure.Figure`` alone: no pyplot, no GUI backend, no global state.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

STUDENT, TEACHER, ROUTED, DROP, PREVIOUS, OTHER = "#2563eb", "#6b7280", "#16a34a", "#dc2626", "#d97706", "#9333ea"
STYLE = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9, "axes.titlesize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6, "axes.axisbelow": True, "legend.frameon": False, "legend.fontsize": 8,
}


def figure(width: float = 7.0, height: float = 2.8, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def to_svg(fig, name: str, title: str) -> str:
    """The figure as an inline <svg> (no XML prolog, no metadata, no namespace URLs), with a <title>."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"distill-report-{name}", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = svg.replace("xlink:href=", "href=")
    svg = re.sub(r"<svg\b", f'<svg role="img" aria-label="{_attr(title)}" data-figure="{name}"', svg, count=1)
    return svg


def _attr(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def render(name: str, title: str, draw, *args: Any, **kw: Any) -> str:
    """Draw a figure with the report's style and return it as inline SVG."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = draw(*args, **kw)
        return to_svg(fig, name, title)


def _hbar(ax, labels: Sequence[str], values: Sequence[float], color: str, fmt: str = "{:,.0f}") -> None:
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=color, height=0.6)
    ax.set_yticks(y, labels)
    top = max(values, default=0) or 1
    for yi, v in zip(y, values, strict=True):
        ax.text(v + top * 0.01, yi, fmt.format(v), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.18)
    ax.grid(axis="y", visible=False)


def harvest(sources: dict[str, tuple[int, int]], reasons: dict[str, int], batches: list[tuple[str, int]]):
    """Records and quarantined rows per source; quarantined rows by reason; records per harvest run."""
    fig, (a, b, c) = figure(9.0, 2.6, 3)
    labels = list(sources)
    y = list(range(len(labels)))[::-1]
    rec = [sources[s][0] for s in labels]
    qua = [sources[s][1] for s in labels]
    a.barh(y, rec, color=STUDENT, height=0.6, label="records")
    a.barh(y, qua, left=rec, color=DROP, height=0.6, label="quarantined")
    a.set_yticks(y, [_short(s, 22) for s in labels])
    a.set_title("rows per source")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    a.grid(axis="y", visible=False)
    if reasons:
        _hbar(b, [_short(r, 24) for r in reasons], list(reasons.values()), DROP)
    else:
        b.text(0.5, 0.5, "nothing quarantined", ha="center", va="center", transform=b.transAxes)
        b.set_axis_off()
    b.set_title("quarantined, by reason")
    _hbar(c, [lbl for lbl, _ in batches] or ["-"], [n for _, n in batches] or [0], STUDENT)
    c.set_title("records per harvest run")
    return fig


def funnel(steps: list[tuple[str, int, int]], splits: dict[str, int]):
    """The curate funnel: records entering each operator and how many it dropped; then the split."""
    fig, (a, b) = figure(9.0, max(2.4, 0.28 * len(steps) + 0.8), 2)
    fig.get_layout_engine().set(wspace=0.05)
    labels = [s[0] for s in steps]
    y = list(range(len(steps)))[::-1]
    kept = [n - d for _, n, d in steps]
    dropped = [d for _, _, d in steps]
    a.barh(y, kept, color=STUDENT, height=0.65, label="passed on")
    a.barh(y, dropped, left=kept, color=DROP, height=0.65, label="dropped")
    top = max((n for _, n, _ in steps), default=1) or 1
    for yi, (_, n, d) in zip(y, steps, strict=True):
        a.text(n + top * 0.01, yi, f"{n:,} in" + (f", −{d:,}" if d else ""), va="center", fontsize=8)
    a.set_yticks(y, labels)
    a.set_xlim(0, top * 1.3)
    a.set_title("records entering each operator")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    a.grid(axis="y", visible=False)
    _hbar(b, list(splits), list(splits.values()), ROUTED)
    b.set_title("kept, by split")
    return fig


def training(series: dict[str, list[tuple[float, float]]]):
    """Training and validation loss (and KD terms) against steps; the learning rate beside."""
    fig, (a, b) = figure(9.0, 2.8, 2)
    colors = {"loss": STUDENT, "eval_loss": DROP}
    for k, pts in series.items():
        if k == "learning_rate" or not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        a.plot(xs, ys, marker="o" if k == "eval_loss" else None, markersize=3, lw=1.4,
               color=colors.get(k, OTHER), label={"loss": "train loss", "eval_loss": "validation loss"}.get(k, k))
    a.set_xlabel("step")
    a.set_title("loss")
    a.legend()
    lr = series.get("learning_rate") or []
    if lr:
        xs, ys = zip(*lr, strict=True)
        b.plot(xs, ys, color=ROUTED, lw=1.4)
        b.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    b.set_xlabel("step")
    b.set_title("learning rate")
    return fig


def quality(groups: list[tuple[str, dict[str, tuple[float, list[float] | None, int]]]],
            teacher: dict[str, float] | None = None, previous: dict[str, float] | None = None):
    """Quality with confidence intervals, one panel per grouping (function, input length, language); the
    teacher's and the previous version's per function as markers."""
    fig, axes = figure(9.0, 2.9, len(groups))
    for ax, (title, rows) in zip(axes, groups, strict=True):
        labels = list(rows)
        y = list(range(len(labels)))[::-1]
        for yi, lbl in zip(y, labels, strict=True):
            q, ci, n = rows[lbl]
            if ci:
                ax.plot([100 * ci[0], 100 * ci[1]], [yi, yi], color=STUDENT, lw=2.2, alpha=0.45,
                        solid_capstyle="butt")
            ax.plot([100 * q], [yi], "o", color=STUDENT, ms=6)
            ax.text(100 * q, yi + 0.22, f"{100 * q:.1f}%", ha="center", fontsize=7.5)
        if teacher and title == "per function":
            ax.plot([100 * teacher.get(lbl, float("nan")) for lbl in labels], y, "|", color=TEACHER, ms=14,
                    mew=2, label="teacher")
        if previous and title == "per function":
            ax.plot([100 * previous.get(lbl, float("nan")) for lbl in labels], y, "D", color=PREVIOUS, ms=5,
                    label="previous version")
        ax.set_yticks(y, [f"{_short(lbl, 18)}\n(n={rows[lbl][2]})" for lbl in labels])
        ax.set_ylim(-0.7, len(labels) - 0.3)
        ax.set_xlim(-3, 106)
        ax.set_xlabel("quality, % (95% CI)")
        ax.set_title(title)
        ax.grid(axis="y", visible=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=7)
    return fig


def fields(acc: dict[str, dict[str, tuple[float, int]]]):
    """JSON field accuracy per function and field."""
    labels, values = [], []
    for fn, per in acc.items():
        for k, (v, _) in per.items():
            labels.append(f"{fn}.{k}")
            values.append(100 * v)
    fig, (a,) = figure(4.6, max(1.6, 0.32 * len(labels) + 0.7))
    _hbar(a, labels, values, STUDENT, "{:.1f}%")
    a.set_xlim(0, 118)
    a.set_title("JSON field accuracy, %")
    return fig


def calibration(curves: dict[str, dict[str, Any]], tolerance: float | None):
    """Routed quality against the share sent to the student, per function, with the interval and the chosen
    operating point."""
    fig, axes = figure(9.0, 2.9, max(1, len(curves)))
    for ax, (fn, c) in zip(axes, curves.items(), strict=False):
        pts = c.get("curve") or []
        xs = [100 * p["student_share"] for p in pts]
        ys = [100 * p["routed_quality"] for p in pts]
        lo = [100 * (p.get("routed_quality_ci") or [p["routed_quality"]] * 2)[0] for p in pts]
        hi = [100 * (p.get("routed_quality_ci") or [p["routed_quality"]] * 2)[1] for p in pts]
        ax.fill_between(xs, lo, hi, color=STUDENT, alpha=0.15, lw=0, label="95% interval")
        ax.plot(xs, ys, color=STUDENT, lw=1.4, label="routed quality")
        chosen = [p for p in pts if p.get("chosen")]
        for p in chosen:
            ax.plot([100 * p["student_share"]], [100 * p["routed_quality"]], "o", ms=8, color=ROUTED,
                    label=f"chosen: {100 * p['student_share']:.1f}% to the student")
        if tolerance is not None and pts:
            ax.axhline(100 * (pts[0]["routed_quality"] - tolerance), color=DROP, lw=0.9, ls="--",
                       label=f"teacher − {100 * tolerance:g} points")
        ax.set_xlabel("share of requests answered by the student, %")
        ax.set_ylabel("routed quality, %")
        ax.set_xlim(-2, 102)
        ax.set_title(fn)
        ax.legend(loc="lower left", fontsize=7)
    return fig


def escalations(reasons: dict[str, int]):
    fig, (a,) = figure(4.6, max(1.4, 0.34 * len(reasons) + 0.7))
    _hbar(a, [_short(r, 34) for r in reasons], list(reasons.values()), TEACHER)
    a.set_title("sent to the teacher, by reason")
    return fig


def formats(points: list[tuple[str, float, float, bool]]):
    """Each artefact's size (MB) against its quality."""
    fig, (a,) = figure(4.6, 2.8)
    for name, mb, q, flagged in points:
        a.plot([mb], [100 * q], "X" if flagged else "o", ms=8, color=DROP if flagged else STUDENT)
        a.annotate(name + (" (flagged)" if flagged else ""), (mb, 100 * q), textcoords="offset points",
                   xytext=(6, 4), fontsize=8)
    mbs = [p[1] for p in points] or [1]
    a.set_xlim(0, max(mbs) * 1.35)
    qs = [100 * p[2] for p in points] or [0]
    a.set_ylim(max(0, min(qs) - 10), min(105, max(qs) + 10))
    a.set_xlabel("weights, MB")
    a.set_ylabel("quality, %")
    a.set_title("size against quality")
    return fig


def costs(bars: list[tuple[str, float, str]]):
    fig, (a,) = figure(4.6, 1.9)
    y = list(range(len(bars)))[::-1]
    a.barh(y, [v for _, v, _ in bars], color=[c for _, _, c in bars], height=0.6)
    top = max((v for _, v, _ in bars), default=1) or 1
    for yi, (_, v, _) in zip(y, bars, strict=True):
        a.text(v + top * 0.01, yi, f"${v:,.4f}" if v >= 0.001 or v == 0 else f"${v:.2e}", va="center", fontsize=8)
    a.set_yticks(y, [lbl for lbl, _, _ in bars])
    a.set_xlim(0, top * 1.3)
    a.set_xlabel("USD per 1,000 requests")
    a.grid(axis="y", visible=False)
    return fig


def timings(durations: list[tuple[str, float]]):
    fig, (a,) = figure(4.6, 1.9)
    _hbar(a, [s for s, _ in durations], [d for _, d in durations], TEACHER, "{:,.1f} s")
    a.set_xlabel("seconds")
    a.set_title("stage timings")
    return fig


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
