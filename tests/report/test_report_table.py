import math
import re

import numpy as np
import pytest
import torch

from hieratok.report import MISSING, MetricSpec, comparison_table, markdown_table, simple_table, table2_metrics
from hieratok.report.table import _md_escape, _md_text

# paper Table 2, f16d16 / KL 1e-6 (the multi-scale row without its generation numbers)
ROWS = {
    "single-scale": {"rfid": 1.47, "psnr": 24.4, "lpips": 0.108, "ssim": 0.74, "gfid": 16.4, "is": 57.4},
    "multi-scale": {"rfid": 1.07, "psnr": 23.8, "lpips": 0.087, "ssim": 0.72, "gfid": None, "is": math.nan},
}


def test_differences_signs_and_format():
    t = comparison_table(ROWS, baseline="single-scale")
    assert t.cell("multi-scale", "rfid").text == "1.07 (-0.40)"
    assert t.cell("multi-scale", "psnr").text == "23.8 (-0.6)"
    assert t.cell("multi-scale", "lpips").text == "0.087 (-0.021)"
    assert t.cell("single-scale", "rfid").text == "1.47"  # baseline: no difference
    # None, NaN and a missing key are "not measured", never 0
    assert t.cell("multi-scale", "gfid").text == MISSING == "\u2013"
    assert t.cell("multi-scale", "is").text == MISSING
    up = comparison_table({"a": {"is": 57.4}, "b": {"is": 68.5}}, "a")
    assert up.cell("b", "is").text == "68.5 (+11.1)"
    same = comparison_table({"a": {"psnr": 24.41}, "b": {"psnr": 24.43}}, "a")
    assert same.cell("b", "psnr").text == "24.4 (\u00b10.0)" and same.cell("b", "psnr").verdict == "same"


def test_better_direction_follows_metric():
    t = comparison_table(ROWS, baseline="single-scale")
    assert t.cell("multi-scale", "rfid").verdict == "better"  # lower rFID is better
    assert t.cell("multi-scale", "lpips").verdict == "better"
    assert t.cell("multi-scale", "psnr").verdict == "worse"  # higher PSNR is better
    assert t.cell("multi-scale", "ssim").verdict == "worse"
    flipped = comparison_table({"a": {"rfid": 1.0, "psnr": 20.0}, "b": {"rfid": 2.0, "psnr": 21.0}}, "a",
                               metrics=[("rfid", "rFID", False, ".2f"), ("psnr", "PSNR", True, ".1f")])
    assert flipped.cell("b", "rfid").verdict == "worse" and flipped.cell("b", "psnr").verdict == "better"
    html = flipped.to_html()
    assert '<span class="delta worse"' in html and "(+1.00)" in html
    assert '<span class="delta better"' in html and "(+1.0)" in html
    no_dir = comparison_table({"a": {"p": 1.0}, "b": {"p": 2.0}}, "a", metrics=[MetricSpec("p", "Params")])
    assert no_dir.cell("b", "p").verdict is None and "delta better" not in no_dir.to_html()


def test_renderings_agree():
    t = comparison_table(ROWS, baseline="single-scale",
                         metrics=table2_metrics(perceptual_key="lpips", perceptual_label="DISTS-lite"))
    md, txt, html = t.to_markdown(), t.to_text(), t.to_html()
    for out in (md, txt, html):
        assert "DISTS-lite" in out and "LPIPS" not in out  # the perceptual column carries its own name
        for s in ("1.07", "(-0.40)", "23.8", "(-0.6)", "0.087", "(-0.021)", "1.47", "24.4"):
            assert s in out
    assert "| multi-scale | 1.07 (-0.40) | 23.8 (-0.6) | 0.087 (-0.021) | 0.72 (-0.02) | \u2013 | \u2013 |" in md
    assert "| --- | ---: |" in md  # numbers right-aligned
    lines = txt.splitlines()
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
    assert lines[2].startswith("single-scale (baseline)")
    assert "rFID \u2193" in md and "PSNR \u2191" in md


def test_bad_input():
    with pytest.raises(ValueError, match="baseline 'x' is not one of the runs"):
        comparison_table(ROWS, baseline="x")
    with pytest.raises(ValueError, match="numbers or None"):
        comparison_table({"a": {"rfid": "good"}}, "a")


def test_markdown_table_generic_rows():
    md = markdown_table([{"scale": 8, "psnr": 18.25, "note": "a|b"}, {"scale": 16, "psnr": None}])
    assert md.splitlines() == [
        "| scale | psnr | note |",
        "| ---: | ---: | --- |",
        "| 8 | 18.25 | a\\|b |",
        f"| 16 | {MISSING} | {MISSING} |",
    ]
    named = markdown_table({"multi": {"psnr": 23.8123}}, floatfmt=".2f", index_header="run")
    assert named.splitlines()[2] == "| multi | 23.81 |"


def test_numpy_and_tensor_numbers_are_formatted_like_floats():
    python = {"psnr": 23.8125, "lpips": 0.5, "fid": math.nan, "n": 3, "ok": True}
    other = {"psnr": np.float32(23.8125), "lpips": torch.tensor(0.5), "fid": np.float32("nan"), "n": np.int64(3),
             "ok": np.bool_(True)}
    want = simple_table([python], floatfmt=".2f")
    got = simple_table([other], floatfmt=".2f")
    assert got.rows == want.rows == [["23.81", "0.50", MISSING, "3", "True"]]
    assert got.align == want.align == ["right", "right", "right", "right", "left"]
    assert simple_table([{"v": [np.float64(0.125), None]}], floatfmt=".1f").rows == [["0.1, " + MISSING]]


def test_markdown_escapes_keep_plain_text_plain():
    cases = {
        "1. not a list": "1\\. not a list",
        "12) neither": "12\\) neither",
        "1.5 dB": "1.5 dB",
        "snake_case & R&amp;D": "snake\\_case \\& R\\&amp;D",
        "~~no strike~~ *no em*": "\\~\\~no strike\\~\\~ \\*no em\\*",
        "# no heading": "\\# no heading",
        "<b>x</b> [a](b) `c` |": "\\<b\\>x\\</b\\> \\[a\\](b) \\`c\\` \\|",
    }
    for text, want in cases.items():
        assert _md_text(text) == want
        assert re.sub(r"\\(.)", r"\1", _md_text(text)) == text  # only escapes were added
    assert _md_escape("a_b & 1. c") == "a\\_b \\& 1. c"  # a table cell never starts a list
