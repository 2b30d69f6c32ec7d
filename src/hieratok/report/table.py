"""Result tables in the layout of the paper's Table 2, rendered as Markdown, HTML and plain text.

A comparison table has one row per run (tokenizer) and one column per metric; every value of a
run other than the baseline carries its difference to the baseline, signed, in the metric's own
format: rFID ``1.47`` for the baseline and ``1.07`` for the other run gives ``1.07 (-0.40)``.
A missing metric is shown as an en dash ``–`` (never as 0). Column headers carry the direction
(``rFID ↓``: lower is better); the HTML rendering colours each difference green when it is better
than the baseline and red when it is worse, judged at the displayed precision.

Example::

    table = comparison_table(
        {"single-scale": {"rfid": 1.47, "psnr": 24.4}, "multi-scale": {"rfid": 1.07, "psnr": 23.8}},
        baseline="single-scale",
        metrics=[("rfid", "rFID", False, ".2f"), ("psnr", "PSNR", True, ".1f")],
    )
    print(table.to_text())
"""

from __future__ import annotations

import html
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

__all__ = [
    "MISSING",
    "MetricSpec",
    "Cell",
    "ComparisonTable",
    "SimpleTable",
    "comparison_table",
    "simple_table",
    "markdown_table",
    "table2_metrics",
]

MISSING = "\u2013"  # en dash: "not measured", distinct from a measured 0
UP, DOWN = "\u2191", "\u2193"
Verdict = Literal["better", "worse", "same"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric column.

    Attributes:
        key: Key of the metric in each run's dict.
        label: Column header (e.g. ``"rFID"``; the perceptual column is labelled by the distance
            actually used, e.g. ``"LPIPS"`` or the offline network's name).
        higher_is_better: Direction used to judge differences; ``None`` for a column with no
            better side (e.g. parameter count), which is then never coloured.
        fmt: Format of values and differences: a format spec (``".2f"``) or a ``str.format``
            template with one field (``"{:.1%}"``).
    """

    key: str
    label: str
    higher_is_better: bool | None = None
    fmt: str = ".2f"

    def format(self, value: float) -> str:
        return self.fmt.format(value) if "{" in self.fmt else format(value, self.fmt)


def table2_metrics(perceptual_key: str = "lpips", perceptual_label: str = "LPIPS") -> list[MetricSpec]:
    """The columns of the paper's Table 2 with its precision: rFID, PSNR, LPIPS, SSIM, gFID, IS.

    Args:
        perceptual_key: Key of the perceptual distance in the run dicts.
        perceptual_label: Its header; use the distance's own name when it is not LPIPS (e.g. an
            offline stand-in network), so the table never claims a metric it did not compute.
    """
    return [
        MetricSpec("rfid", "rFID", False, ".2f"),
        MetricSpec("psnr", "PSNR", True, ".1f"),
        MetricSpec(perceptual_key, perceptual_label, False, ".3f"),
        MetricSpec("ssim", "SSIM", True, ".2f"),
        MetricSpec("gfid", "gFID", False, ".1f"),
        MetricSpec("is", "IS", True, ".1f"),
    ]


@dataclass(frozen=True)
class Cell:
    """One rendered table entry.

    Attributes:
        value: The metric value, or ``None`` when missing.
        delta: ``value - baseline value``, or ``None`` (baseline row, or either value missing).
        value_text: ``value`` formatted, or ``"–"``.
        delta_text: Signed difference (``"-0.40"``, ``"+11.1"``, ``"±0.00"``), or ``""``.
        verdict: ``"better"`` / ``"worse"`` / ``"same"`` than the baseline at the displayed
            precision, or ``None`` (no difference, or a metric without direction).
    """

    value: float | None
    delta: float | None
    value_text: str
    delta_text: str = ""
    verdict: Verdict | None = None

    @property
    def text(self) -> str:
        """``"1.07 (-0.40)"``, ``"1.47"`` or ``"–"``."""
        return f"{self.value_text} ({self.delta_text})" if self.delta_text else self.value_text


def _clean(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"metric values must be numbers or None, got {v!r}") from None
    return None if math.isnan(f) else f


def _is_zero_text(s: str) -> bool:
    """True when a formatted number shows no non-zero digit (``"0.00"``, ``"0.0%"``, ``"0.00e+00"``)."""
    mantissa = re.split(r"[eE]", s)[0]
    return re.search(r"[1-9]", mantissa) is None


def _cell(value: float | None, base: float | None, spec: MetricSpec, is_baseline: bool) -> Cell:
    if value is None:
        return Cell(None, None, MISSING)
    value_text = spec.format(value)
    if is_baseline or base is None:
        return Cell(value, None, value_text)
    delta = value - base
    magnitude = spec.format(abs(delta))
    if _is_zero_text(magnitude):
        verdict_same: Verdict | None = "same" if spec.higher_is_better is not None else None
        return Cell(value, delta, value_text, "\u00b1" + magnitude, verdict_same)
    delta_text = ("+" if delta > 0 else "-") + magnitude
    verdict: Verdict | None = None
    if spec.higher_is_better is not None:
        verdict = "better" if (delta > 0) == spec.higher_is_better else "worse"
    return Cell(value, delta, value_text, delta_text, verdict)


# --------------------------------------------------------------------------------------------
# Plain table (header + rows of strings) shared by the renderers


_MD_SPECIAL = re.compile(r"([\\`*_~&\[\]<>|])")
_MD_LIST_NUMBER = re.compile(r"^(\d+)([.)])(?=\s|$)")  # "1. " / "1) " would start an ordered list


def _md_text(s: str) -> str:
    """Markdown for plain text: characters with Markdown meaning are backslash-escaped."""
    s = _MD_SPECIAL.sub(r"\\\1", str(s).replace("\n", " "))
    s = _MD_LIST_NUMBER.sub(r"\1\\\2", s)
    return "\\" + s if s[:1] in ("#", "-", "+", "=") else s


def _md_escape(s: str) -> str:
    """Markdown for a table cell (also safe inline)."""
    return _MD_SPECIAL.sub(r"\\\1", str(s).replace("\n", " "))


@dataclass
class SimpleTable:
    """A table of strings with per-column alignment, rendered as Markdown, HTML or text.

    Attributes:
        header: Column headers.
        rows: Rows of cell strings (same length as ``header``).
        align: Per column ``"left"`` or ``"right"``.
        caption: Optional caption.
    """

    header: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)
    caption: str | None = None

    def __post_init__(self) -> None:
        if not self.align:
            self.align = ["left"] * len(self.header)
        for r in self.rows:
            if len(r) != len(self.header):
                raise ValueError(f"row {r} has {len(r)} cells for {len(self.header)} columns")

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown table (caption as a line above it)."""
        sep = ["---:" if a == "right" else "---" for a in self.align]
        lines = [] if not self.caption else [f"*{_md_text(self.caption)}*", ""]
        lines.append("| " + " | ".join(_md_escape(h) for h in self.header) + " |")
        lines.append("| " + " | ".join(sep) + " |")
        lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines)

    def to_text(self) -> str:
        """Aligned monospace columns for a terminal."""
        widths = [max(len(s) for s in col) for col in zip(self.header, *self.rows)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if a == "right" else c.ljust(w)
                             for c, w, a in zip(cells, widths, self.align)).rstrip()

        out = [self.caption] if self.caption else []
        out += [line(self.header), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in self.rows]
        return "\n".join(out)

    def to_html(self) -> str:
        """An HTML ``<table>`` (first column as row headers)."""
        e = html.escape
        parts = ['<table class="data">']
        if self.caption:
            parts.append(f"<caption>{e(self.caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f'<th scope="col" class="{a}">{e(h)}</th>'
                                             for h, a in zip(self.header, self.align)) + "</tr></thead>")
        parts.append("<tbody>")
        for r in self.rows:
            cells = [f'<th scope="row">{e(r[0])}</th>'] + [f'<td class="{a}">{e(c)}</td>'
                                                           for c, a in zip(r[1:], self.align[1:])]
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.to_text()


def _scalar(v: Any) -> Any:
    """A NumPy scalar, 0-d array or 0-d tensor as the Python number it holds; anything else as is."""
    return v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt_any(v: Any, floatfmt: str) -> str:
    v = _scalar(v)
    if v is None or (_is_number(v) and math.isnan(v)):
        return MISSING
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return str(int(v))
    if _is_number(v):
        return format(float(v), floatfmt)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_any(t, floatfmt) for t in v)
    return str(v)


def simple_table(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".4g",
    index_header: str = "",
    caption: str | None = None,
) -> SimpleTable:
    """Build a :class:`SimpleTable` from dict rows.

    Args:
        rows: A list of ``{column: value}`` dicts, or ``{row name: {column: value}}`` (the names
            become the first column, headed ``index_header``).
        columns: Columns in order; default the union of the rows' keys in first-seen order.
        floatfmt: Format spec for real numbers (Python, NumPy, 0-d tensors); integers and
            strings are shown as they are; ``None`` / NaN / a missing key as ``–``. Columns of
            numbers are right-aligned.
        index_header: Header of the name column for dict-of-dicts input.
        caption: Optional caption.
    """
    named = isinstance(rows, Mapping)
    items: list[tuple[str | None, Mapping[str, Any]]] = (
        [(str(k), v) for k, v in rows.items()] if named else [(None, r) for r in rows])
    if columns is None:
        columns = []
        for _, r in items:
            columns += [k for k in r if k not in columns]
    columns = list(columns)
    body = [[_fmt_any(r.get(c), floatfmt) for c in columns] for _, r in items]
    numeric = [all(_is_number(_scalar(r.get(c))) for _, r in items if r.get(c) is not None) for c in columns]
    align = ["right" if n else "left" for n in numeric]
    header = [str(c) for c in columns]
    if named:
        header = [index_header] + header
        body = [[name] + b for (name, _), b in zip(items, body)]
        align = ["left"] + align
    return SimpleTable(header, body, align, caption)


def markdown_table(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".4g",
    index_header: str = "",
) -> str:
    """Markdown table from dict rows (see :func:`simple_table` for the arguments)."""
    return simple_table(rows, columns, floatfmt, index_header).to_markdown()


# --------------------------------------------------------------------------------------------
# Comparison table


@dataclass
class ComparisonTable:
    """Runs x metrics with differences to a baseline run (build with :func:`comparison_table`).

    Attributes:
        metrics: The metric columns.
        baseline: Name of the baseline run.
        runs: Run names in row order.
        cells: ``cells[i][j]`` for run ``i`` and metric ``j``.
        row_header: Header of the run-name column.
        caption: Optional caption.
    """

    metrics: list[MetricSpec]
    baseline: str
    runs: list[str]
    cells: list[list[Cell]]
    row_header: str = "Tokenizer"
    caption: str | None = None

    def cell(self, run: str, key: str) -> Cell:
        """The cell of ``run`` for metric ``key``."""
        try:
            i = self.runs.index(run)
        except ValueError:
            raise KeyError(f"no run {run!r} (runs: {self.runs})") from None
        for j, m in enumerate(self.metrics):
            if m.key == key:
                return self.cells[i][j]
        raise KeyError(f"no metric {key!r} (metrics: {[m.key for m in self.metrics]})")

    def _header(self) -> list[str]:
        arrows = {True: f" {UP}", False: f" {DOWN}", None: ""}
        return [self.row_header] + [m.label + arrows[m.higher_is_better] for m in self.metrics]

    def _run_label(self, run: str) -> str:
        return f"{run} (baseline)" if run == self.baseline else run

    def legend(self) -> str:
        """One sentence that explains the notation."""
        return (f"Differences in parentheses are to {self.baseline}; {DOWN} lower is better, "
                f"{UP} higher is better; {MISSING} not measured.")

    def as_simple(self) -> SimpleTable:
        rows = [[self._run_label(r)] + [c.text for c in cells] for r, cells in zip(self.runs, self.cells)]
        return SimpleTable(self._header(), rows, ["left"] + ["right"] * len(self.metrics), self.caption)

    def to_markdown(self) -> str:
        """Markdown table followed by the legend line."""
        return self.as_simple().to_markdown() + f"\n\n{self.legend()}"

    def to_text(self) -> str:
        """Aligned plain text for a terminal, followed by the legend line."""
        return self.as_simple().to_text() + f"\n{self.legend()}"

    def to_html(self) -> str:
        """HTML table; better / worse differences carry the classes ``better`` / ``worse``."""
        e = html.escape
        dirs = {True: "higher is better", False: "lower is better", None: ""}
        parts = ['<table class="data cmp">']
        if self.caption:
            parts.append(f"<caption>{e(self.caption)}</caption>")
        head = [f'<th scope="col">{e(self.row_header)}</th>']
        for m, h in zip(self.metrics, self._header()[1:]):
            title = f' title="{dirs[m.higher_is_better]}"' if m.higher_is_better is not None else ""
            head.append(f'<th scope="col" class="right"{title}>{e(h)}</th>')
        parts.append("<thead><tr>" + "".join(head) + "</tr></thead>")
        parts.append("<tbody>")
        marks = {"better": "\u2713", "worse": "\u2717"}  # check / cross, so colour is not the only cue
        for run, cells in zip(self.runs, self.cells):
            is_base = run == self.baseline
            name = e(run) + (' <span class="tag">baseline</span>' if is_base else "")
            row = [f'<th scope="row">{name}</th>']
            for m, c in zip(self.metrics, cells):
                if c.value is None:
                    row.append(f'<td class="right missing" title="not measured">{MISSING}</td>')
                    continue
                inner = e(c.value_text)
                if c.delta_text:
                    cls = f"delta {c.verdict}" if c.verdict else "delta"
                    mark = f" {marks[c.verdict]}" if c.verdict in marks else ""
                    tip = f' title="{c.verdict} than {e(self.baseline)} ({dirs[m.higher_is_better]})"' \
                        if c.verdict in marks else ""
                    inner += f' <span class="{cls}"{tip}>({e(c.delta_text)}){mark}</span>'
                row.append(f'<td class="right">{inner}</td>')
            tr = '<tr class="baseline">' if is_base else "<tr>"
            parts.append(tr + "".join(row) + "</tr>")
        parts.append("</tbody></table>")
        parts.append(f'<p class="legend">{e(self.legend())} Green: better than the baseline, '
                     "red: worse, at the precision shown.</p>")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.to_text()


def comparison_table(
    rows: Mapping[str, Mapping[str, float | None]],
    baseline: str,
    metrics: Iterable[MetricSpec | tuple[str, str, bool | None, str]] | None = None,
    row_header: str = "Tokenizer",
    caption: str | None = None,
) -> ComparisonTable:
    """Compare runs against a baseline run, Table-2 style.

    Args:
        rows: ``{run name: {metric key: value or None}}``, in display order. Keys a run lacks,
            ``None`` and NaN all mean "not measured" and render as ``–``.
        baseline: The run the differences are taken to (must be in ``rows``).
        metrics: Columns as :class:`MetricSpec` or ``(key, label, higher_is_better, fmt)``
            tuples; default :func:`table2_metrics`.
        row_header: Header of the run-name column.
        caption: Optional caption.

    Returns:
        A :class:`ComparisonTable` with ``to_markdown()``, ``to_html()`` and ``to_text()``.
    """
    if not rows:
        raise ValueError("rows must hold at least one run")
    if baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {list(rows)}")
    specs = [m if isinstance(m, MetricSpec) else MetricSpec(*m)
             for m in (table2_metrics() if metrics is None else metrics)]
    if not specs:
        raise ValueError("metrics must name at least one column")
    keys = [m.key for m in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate metric keys in {keys}")
    base = {m.key: _clean(rows[baseline].get(m.key)) for m in specs}
    runs = [str(r) for r in rows]
    cells = [[_cell(_clean(vals.get(m.key)), base[m.key], m, run == baseline) for m in specs]
             for run, vals in rows.items()]
    return ComparisonTable(specs, str(baseline), runs, cells, row_header, caption)
