"""A self-contained HTML report with a Markdown twin.

:class:`Report` collects blocks (headings, paragraphs, tables, images, key-value lists) and
:meth:`Report.write` puts ``report.html`` and ``report.md`` in one folder. The HTML has its CSS
inline and no scripts or external assets; images are referenced by relative path (copied into
``images/`` when they live outside the folder), or embedded as base64 with ``embed_images=True``,
so the folder (or the single HTML file, when embedded) can be zipped, mailed or opened on a
phone. The Markdown twin shows the same text, tables and images.

Example::

    report = Report("HieraTok vs single-scale twin, 64 px")
    report.add_key_values({"machine": "1x H100", "torch": torch.__version__})
    report.add_table(comparison_table(rows, baseline="single-scale"))
    report.add_image("runs/recon.png", "Reconstructions, coarse to fine", pixelated=True)
    report.write("runs/report")
"""

from __future__ import annotations

import base64
import html
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..version import __version__
from .table import ComparisonTable, SimpleTable, _md_escape, _md_text, simple_table

__all__ = ["Report"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}

# pixelated images narrower than this are displayed at an integer zoom
PIXELATED_DISPLAY_WIDTH = 800

# names under <report>/images/ that Report.write copied there (and may overwrite on the next write)
_COPIES = ".hieratok-copies"

_CSS = """
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #ffffff; --muted: #5f6368; --line: #d9d9d9;
  --head: #f3f4f6; --base: #fafafa; --good: #137333; --bad: #b3261e; --code: #f3f4f6; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8e8; --bg: #17181a; --muted: #a0a4a8; --line: #3a3c40; --head: #232529;
    --base: #1e2023; --good: #5bd17f; --bad: #ff8a80; --code: #232529; }
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { margin: 0 auto; max-width: 72rem; padding: 1rem 1.25rem 3rem; color: var(--fg);
  background: var(--bg); font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 1.7rem; line-height: 1.25; margin: .6rem 0 1rem; }
h2 { font-size: 1.3rem; margin: 2rem 0 .6rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
h3, h4 { font-size: 1.1rem; margin: 1.4rem 0 .5rem; }
p { margin: .6rem 0; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: .8rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: .2rem 0; }
th, td { padding: .35rem .65rem; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
table.data th, table.data td { white-space: nowrap; }
thead th { background: var(--head); font-weight: 600; }
tbody th { font-weight: 600; }
.right { text-align: right; }
.delta { font-size: .85em; }
.better { color: var(--good); }
.worse { color: var(--bad); }
.missing { color: var(--muted); }
tr.baseline > * { background: var(--base); }
.tag { font-size: .72em; font-weight: 500; color: var(--muted); border: 1px solid var(--line);
  border-radius: .3em; padding: 0 .3em; margin-left: .3em; }
.legend { color: var(--muted); font-size: .85rem; margin-top: .2rem; }
table.kv td { word-break: break-word; }
table.kv th { white-space: nowrap; }
code { background: var(--code); border-radius: .25em; padding: 0 .25em; font-size: .9em; }
figure { margin: 1.2rem 0; }
figure img { display: block; max-width: 100%; height: auto; background: #fff; }
img.pixelated { image-rendering: pixelated; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .35rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; }
@media (max-width: 600px) {
  body { padding: .6rem .7rem 2rem; font-size: 15px; }
  h1 { font-size: 1.35rem; }
  th, td { padding: .3rem .45rem; }
}
""".strip()


@dataclass
class _Heading:
    text: str
    level: int


@dataclass
class _Paragraph:
    text: str


@dataclass
class _Table:
    table: ComparisonTable | SimpleTable


@dataclass
class _Image:
    path: Path
    caption: str
    alt: str
    embed: bool | None
    pixelated: bool


@dataclass
class _KeyValues:
    items: list[tuple[str, str]]
    title: str | None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _flatten(v, key + ".")
        elif isinstance(v, (list, tuple)):
            out.append((key, ", ".join(str(t) for t in v)))
        elif v is None:
            out.append((key, "\u2013"))
        else:
            out.append((key, str(v)))
    return out


class Report:
    """Builder of a self-contained HTML report and its Markdown twin.

    Args:
        title: Page title and top heading.
        embed_images: Embed every image as base64 in the HTML (one file that works alone);
            :meth:`add_image` can override this per image. The Markdown twin always references
            the image files.
    """

    def __init__(self, title: str, embed_images: bool = False) -> None:
        if not str(title).strip():
            raise ValueError("report title must not be empty")
        self.title = str(title)
        self.embed_images = embed_images
        self._blocks: list[Any] = []

    def add_heading(self, text: str, level: int = 2) -> "Report":
        """Add a section heading (``level`` 2..4; the title is level 1)."""
        if level not in (2, 3, 4):
            raise ValueError(f"heading level must be 2, 3 or 4, got {level}")
        self._blocks.append(_Heading(str(text), level))
        return self

    def add_paragraph(self, text: str) -> "Report":
        """Add a paragraph of plain text (blank lines start new paragraphs)."""
        for para in str(text).split("\n\n"):
            if para.strip():
                self._blocks.append(_Paragraph(" ".join(para.split())))
        return self

    def add_table(
        self,
        table: ComparisonTable | SimpleTable | Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
        floatfmt: str = ".4g",
        index_header: str = "",
    ) -> "Report":
        """Add a comparison table, a :class:`SimpleTable`, or dict rows (see ``simple_table``)."""
        if not isinstance(table, (ComparisonTable, SimpleTable)):
            table = simple_table(table, floatfmt=floatfmt, index_header=index_header)
        self._blocks.append(_Table(table))
        return self

    def add_image(
        self,
        path: PathLike,
        caption: str = "",
        alt: str | None = None,
        embed: bool | None = None,
        pixelated: bool = False,
    ) -> "Report":
        """Add an image file (PNG, JPEG, GIF, WebP or SVG).

        Args:
            path: The image; it must exist now. At :meth:`write` it is referenced relative to the
                report folder, and copied into ``<folder>/images/`` if it lies outside.
            caption: Text under the image.
            alt: Alternative text (default: the caption or the file name).
            embed: Embed as base64 in the HTML; default the report's ``embed_images``.
            pixelated: Keep pixels sharp when the browser scales the image (for grids of small
                images; leave off for plots).
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        if p.suffix.lower() not in _MIME:
            raise ValueError(f"unsupported image type {p.suffix!r} for {p} (use one of {sorted(_MIME)})")
        self._blocks.append(_Image(p.resolve(), str(caption), alt if alt is not None else (caption or p.name),
                                   embed, pixelated))
        return self

    def add_key_values(self, items: Mapping[str, Any], title: str | None = None) -> "Report":
        """Add a two-column key / value list (machine, versions, config, weights per metric...).

        Nested dicts are flattened to dotted keys (``model.depth``); lists are comma-joined.
        """
        if not isinstance(items, Mapping):
            raise ValueError(f"items must be a dict, got {type(items).__name__}")
        self._blocks.append(_KeyValues(_flatten(items), title))
        return self

    # ------------------------------------------------------------------------------------------

    def _place_images(self, out_dir: Path) -> dict[Path, str]:
        """Relative reference for every image; copies the ones outside ``out_dir`` into images/.

        Images already inside ``out_dir`` are referenced where they are. A copy never overwrites
        a file that an image block references or that no earlier write copied there (those are
        listed in ``images/.hieratok-copies``); it takes a free name (``a_1.png``) instead. An
        earlier copy is overwritten, so writing again does not pile up files.
        """
        paths = list(dict.fromkeys(b.path for b in self._blocks if isinstance(b, _Image)))
        refs: dict[Path, str] = {}
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"image not found: {p}")
            if p.is_relative_to(out_dir):
                refs[p] = p.relative_to(out_dir).as_posix()
        taken = set(refs.values())  # reserved before any copy is named
        manifest = out_dir / "images" / _COPIES
        ours = set(manifest.read_text(encoding="utf-8").splitlines()) if manifest.is_file() else set()
        copied = []
        for p in paths:
            if p in refs:
                continue
            name, n = p.name, 1
            while f"images/{name}" in taken or ((out_dir / "images" / name).exists() and name not in ours):
                name = f"{p.stem}_{n}{p.suffix}"
                n += 1
            manifest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out_dir / "images" / name)
            refs[p] = f"images/{name}"
            taken.add(refs[p])
            copied.append(name)
        if copied:
            manifest.write_text("\n".join(sorted(ours | set(copied))) + "\n", encoding="utf-8")
        return refs

    def to_html(self, image_refs: Mapping[Path, str] | None = None) -> str:
        """The HTML document (image ``src`` from ``image_refs``, else the absolute file URI)."""
        e = html.escape
        out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
               '<meta name="viewport" content="width=device-width, initial-scale=1">',
               '<meta name="generator" content="hieratok">',
               f"<title>{e(self.title)}</title>", f"<style>\n{_CSS}\n</style>", "</head>", "<body>",
               "<main>", f"<h1>{e(self.title)}</h1>"]
        for b in self._blocks:
            if isinstance(b, _Heading):
                out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
            elif isinstance(b, _Paragraph):
                out.append(f"<p>{e(b.text)}</p>")
            elif isinstance(b, _Table):
                out.append(f'<div class="scroll">\n{b.table.to_html()}\n</div>')
            elif isinstance(b, _KeyValues):
                rows = "".join(f'<tr><th scope="row">{e(k)}</th><td>{e(v)}</td></tr>' for k, v in b.items)
                cap = f"<caption>{e(b.title)}</caption>" if b.title else ""
                out.append(f'<div class="scroll"><table class="kv">{cap}<tbody>{rows}</tbody></table></div>')
            elif isinstance(b, _Image):
                embed = self.embed_images if b.embed is None else b.embed
                if embed:
                    data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                    src = f"data:{_MIME[b.path.suffix.lower()]};base64,{data}"
                else:
                    src = (image_refs or {}).get(b.path) or b.path.as_uri()
                size = _image_size(b.path)
                dims = ""
                if size:
                    # a small pixel grid is shown at an integer zoom (CSS still caps it at 100%)
                    zoom = max(1, min(4, PIXELATED_DISPLAY_WIDTH // size[0])) if b.pixelated else 1
                    dims = f' width="{size[0] * zoom}" height="{size[1] * zoom}"'
                cls = ' class="pixelated"' if b.pixelated else ""
                cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
                img = f'<img src="{e(src)}" alt="{e(b.alt)}"{dims}{cls} loading="lazy">'
                if not embed:  # tap / click opens the full-size picture
                    img = f'<a href="{e(src)}">{img}</a>'
                out.append(f"<figure>{img}{cap}</figure>")
        out += ["</main>", f"<footer>Generated by hieratok {e(_version())}.</footer>", "</body>", "</html>"]
        return "\n".join(out) + "\n"

    def to_markdown(self, image_refs: Mapping[Path, str] | None = None) -> str:
        """The Markdown twin (same text, tables and images)."""
        out = [f"# {_md_text(self.title)}"]
        for b in self._blocks:
            if isinstance(b, _Heading):
                out.append("#" * b.level + " " + _md_text(b.text))
            elif isinstance(b, _Paragraph):
                out.append(_md_text(b.text))
            elif isinstance(b, _Table):
                out.append(b.table.to_markdown())
            elif isinstance(b, _KeyValues):
                lines = [f"*{_md_text(b.title)}*", ""] if b.title else []
                lines += ["| Key | Value |", "| --- | --- |"]
                lines += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in b.items]
                out.append("\n".join(lines))
            elif isinstance(b, _Image):
                ref = (image_refs or {}).get(b.path) or b.path.as_posix()
                alt = b.alt.replace("[", "(").replace("]", ")").replace("\n", " ")
                md = f"![{alt}](<{ref}>)"
                if b.caption:
                    md += f"\n\n*{_md_text(b.caption)}*"
                out.append(md)
        out.append(f"<sub>Generated by hieratok {_version()}.</sub>")
        return "\n\n".join(out) + "\n"

    def write(self, out_dir: PathLike) -> Path:
        """Write ``report.html`` and ``report.md`` (and copies of outside images) into ``out_dir``.

        Returns:
            The path of ``report.html``.
        """
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        refs = self._place_images(out)
        html_path = out / "report.html"
        html_path.write_text(self.to_html(refs), encoding="utf-8")
        (out / "report.md").write_text(self.to_markdown(refs), encoding="utf-8")
        logger.info("wrote %s and report.md", html_path)
        return html_path


def _image_size(path: Path) -> tuple[int, int] | None:
    if path.suffix.lower() == ".svg":
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except OSError:
        return None


def _version() -> str:
    return __version__
