"""Synthetic charts (OCR 2.0 style, DeepSeek-OCR paper section 3.4): matplotlib bar, line and
pie charts whose target is the underlying data as an HTML table.

Table layout: the first row is the header (empty corner cell, then one cell per series); each
further row is one category followed by its values, formatted exactly as the chart's value
labels / data were generated (fixed decimals). Drawn with the object-oriented matplotlib API on
an Agg canvas (no pyplot global state), so it is safe in worker processes.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from data_tools.synth.page import html_table

CHART_KINDS = ("bar", "barh", "grouped_bar", "line", "pie")
_CATEGORY_SETS = (
    [str(y) for y in range(2010, 2025)],
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
    ["Q1", "Q2", "Q3", "Q4"],
    ["North", "South", "East", "West", "Central"],
    ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta"],
    ["Apples", "Pears", "Plums", "Grapes", "Cherries", "Lemons"],
)
_SERIES_NAMES = ("Revenue", "Cost", "Profit", "Sales", "Users", "Growth", "Exports", "Imports", "Score")
_TITLES = ("Annual report", "Quarterly results", "Regional comparison", "Survey results", "Market share", "")


@dataclass
class Chart:
    image: Image.Image
    table: list[list[str]]
    kind: str

    @property
    def html(self) -> str:
        return html_table(self.table)


def render_chart(rng: random.Random, kind: str | None = None, dpi: int = 100) -> Chart:
    """Draw one random chart; returns the image and its data table."""
    kind = kind or rng.choice(CHART_KINDS)
    if kind not in CHART_KINDS:
        raise ValueError(f"chart kind {kind!r} not in {CHART_KINDS}")
    cats_all = rng.choice(_CATEGORY_SETS)
    n_cat = rng.randint(3, min(8, len(cats_all)))
    start = rng.randint(0, len(cats_all) - n_cat)
    cats = cats_all[start : start + n_cat]
    n_series = 1 if kind in ("bar", "barh", "pie") else rng.randint(2, 3)
    series = rng.sample(_SERIES_NAMES, n_series)
    decimals = rng.choice((0, 1, 2))
    scale = rng.choice((10, 100, 1000))
    values = [[round(rng.uniform(0.05, 1.0) * scale, decimals) for _ in cats] for _ in series]
    fmt = f"{{:.{decimals}f}}"

    fig = Figure(figsize=(rng.uniform(5.0, 8.0), rng.uniform(3.5, 5.5)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in rng.sample(range(10), n_series)]
    if kind == "pie":  # shares in percent, printed next to each wedge
        total = sum(values[0])
        values[0] = [round(100 * v / total, decimals) for v in values[0]]
        labels = [f"{c} {fmt.format(v)}%" for c, v in zip(cats, values[0])]
        ax.pie(values[0], labels=labels, colors=[f"C{i % 10}" for i in range(len(cats))])
        ax.set_aspect("equal")
    elif kind in ("bar", "barh", "grouped_bar"):
        width = 0.8 / n_series
        for s, (name, vals) in enumerate(zip(series, values)):
            pos = [i + (s - (n_series - 1) / 2) * width for i in range(n_cat)]
            bars = (ax.barh if kind == "barh" else ax.bar)(pos, vals, width, label=name, color=colors[s])
            if rng.random() < 0.6:
                ax.bar_label(bars, labels=[fmt.format(v) for v in vals], fontsize=8)
        (ax.set_yticks if kind == "barh" else ax.set_xticks)(range(n_cat), cats)
    else:
        for s, (name, vals) in enumerate(zip(series, values)):
            ax.plot(range(n_cat), vals, marker=rng.choice("os^D"), label=name, color=colors[s])
            if rng.random() < 0.6:
                for i, v in enumerate(vals):
                    ax.annotate(
                        fmt.format(v),
                        (i, v),
                        textcoords="offset points",
                        xytext=(0, 5),
                        ha="center",
                        fontsize=8,
                    )
        ax.set_xticks(range(n_cat), cats)
    title = rng.choice(_TITLES)
    if title:
        ax.set_title(title)
    if n_series > 1 or (kind != "pie" and rng.random() < 0.5):
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    table = [[""] + list(series)]
    for i, cat in enumerate(cats):
        table.append([cat] + [fmt.format(values[s][i]) for s in range(n_series)])
    return Chart(img, table, kind)
