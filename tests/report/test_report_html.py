import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from hieratok.report import Report, comparison_table, save_image_grid

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "track"}


class StrictChecker(HTMLParser):
    """Collects errors a browser would silently repair: unclosed / misnested tags, bad doctype."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.doctype = [], [], None
        self.imgs, self.links, self.text = [], [], []
        self.external = []

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
            if "alt" not in a:
                self.errors.append("img without alt")
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        if tag == "a":
            self.links.append(a.get("href"))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void element {tag}")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check(html_text):
    p = StrictChecker()
    p.feed(html_text)
    p.close()
    assert p.doctype and p.doctype.lower() == "doctype html"
    assert not p.errors, p.errors
    assert not p.stack, f"unclosed: {p.stack}"
    assert not p.external
    return p


@pytest.fixture
def sample(tmp_path):
    img = tmp_path / "src" / "grid.png"
    save_image_grid([[torch.zeros(3, 4, 4), torch.ones(3, 8, 8)]], img, col_labels=["4px", "8px"])
    rows = {"single-scale": {"rfid": 1.47, "psnr": 24.4, "lpips": 0.108},
            "multi-scale <ms> & co": {"rfid": 1.07, "psnr": 23.8, "lpips": None}}
    table = comparison_table(rows, "single-scale", metrics=[("rfid", "rFID", False, ".2f"),
                                                           ("psnr", "PSNR", True, ".1f"),
                                                           ("lpips", "LPIPS", False, ".3f")])
    r = Report("Demo <report>")
    r.add_key_values({"machine": "2-core CPU", "metrics": {"rFID": "pt_inception-2015-12-05"}, "scales": [8, 16]})
    r.add_heading("Table 2")
    r.add_table(table)
    r.add_paragraph("Reconstructions, coarse to fine.\n\n# not a heading")
    r.add_image(img, "pyramid | grid", pixelated=True)
    r.add_table({"multi": {"8px": 18.2}}, index_header="run")
    return r, img


def test_report_html_is_valid_and_self_contained(sample, tmp_path):
    report, img = sample
    out = tmp_path / "out"
    html_path = report.write(out)
    text = html_path.read_text(encoding="utf-8")
    p = _check(text)
    assert "<style>" in text and "viewport" in text
    assert not re.search(r"(src|href)=\"(https?:|//)", text)  # nothing fetched from outside
    # images are referenced relatively and exist next to the HTML (outside files were copied)
    assert [i["src"] for i in p.imgs] == ["images/grid.png"]
    for ref in [i["src"] for i in p.imgs] + p.links:
        assert not Path(ref).is_absolute() and (out / ref).is_file()
    assert (out / "images" / "grid.png").read_bytes() == img.read_bytes()
    assert "Demo <report>" in "".join(p.text)  # escaped, shown as text
    assert "multi-scale <ms> & co" in "".join(p.text)
    # writing again is idempotent (no grid_1.png pile-up)
    report.write(out)
    assert sorted(x.name for x in (out / "images").iterdir() if x.suffix == ".png") == ["grid.png"]


def test_copies_never_overwrite_files_they_do_not_own(tmp_path):
    out = tmp_path / "out"
    mine, other, third = out / "images" / "a.png", tmp_path / "src" / "a.png", tmp_path / "x" / "b.png"
    save_image_grid([[torch.zeros(3, 2, 2)]], mine)
    save_image_grid([[torch.ones(3, 4, 4)]], other)
    save_image_grid([[torch.ones(3, 3, 3)]], third)
    unreferenced = out / "images" / "b.png"  # the user's file, in no block
    unreferenced.write_bytes(b"user data")
    mine_bytes = mine.read_bytes()
    # the outside a.png comes first: the in-folder reference must still be reserved
    r = Report("x").add_image(other, "outside").add_image(mine, "inside").add_image(third, "b")
    p = _check(r.write(out).read_text())
    srcs = [i["src"] for i in p.imgs]
    assert srcs[1] == "images/a.png" and len(set(srcs)) == 3
    assert mine.read_bytes() == mine_bytes and unreferenced.read_bytes() == b"user data"
    assert (out / srcs[0]).read_bytes() == other.read_bytes()
    assert (out / srcs[2]).read_bytes() == third.read_bytes()
    # a second write reuses its own copies instead of piling up new names
    assert [i["src"] for i in _check(r.write(out).read_text()).imgs] == srcs
    assert len(list((out / "images").glob("*.png"))) == 4


def test_markdown_twin_has_same_numbers(sample, tmp_path):
    report, _ = sample
    out = tmp_path / "out"
    report.write(out)
    md = (out / "report.md").read_text(encoding="utf-8")
    html_text = (out / "report.html").read_text(encoding="utf-8")
    numbers = lambda s: sorted(re.findall(r"[-+\u00b1]?\d+\.\d+", s))  # noqa: E731
    body = html_text.split("<main>")[1]
    assert numbers(md) == numbers(re.sub(r"<[^>]+>", " ", body))
    assert "| multi-scale \\<ms\\> \\& co | 1.07 (-0.40) | 23.8 (-0.6) | \u2013 |" in md
    assert "![pyramid | grid](<images/grid.png>)" in md
    assert "\\# not a heading" in md  # plain text stays plain
    assert md.startswith("# Demo \\<report\\>")


def test_embedded_images_and_bad_input(tmp_path):
    img = tmp_path / "a.png"
    save_image_grid([[torch.zeros(3, 2, 2)]], img)
    r = Report("x", embed_images=True).add_image(img, "c")
    out = r.write(tmp_path / "emb")
    p = _check(out.read_text())
    assert p.imgs[0]["src"].startswith("data:image/png;base64,")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        Report("x").add_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="heading level"):
        Report("x").add_heading("h", level=1)
