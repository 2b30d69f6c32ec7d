"""The lean core install and its extras: pyproject.toml, hieratok._optional and the README agree, no
module imports an optional package except through ``require``, and with every optional package
missing the core still works while each feature that needs one fails with one line naming its extra."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from hieratok import HieraTok
from hieratok._optional import CORE, OPTIONAL, MissingExtraError, require
from hieratok.version import __version__

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEV_TOOLS = {"pytest", "ruff"}


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503), without version or markers."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", name.strip(), maxsplit=1)[0]).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extras() -> dict[str, set[str]]:
    """Extra -> the distributions it installs, with ``hieratok[a,b]`` self-references expanded."""
    raw = project()["optional-dependencies"]

    def expand(extra: str) -> set[str]:
        out: set[str] = set()
        for req in raw[extra]:
            m = re.fullmatch(r"hieratok\[(.*)\]", req.strip())
            out |= set().union(*(expand(e.strip()) for e in m.group(1).split(","))) if m else {norm(req)}
        return out

    return {e: expand(e) for e in raw}


def test_core_dependencies_are_the_documented_list():
    core = sorted(norm(r) for r in project()["dependencies"])
    assert core == sorted(norm(d) for d in CORE) and len(core) == 7  # 16 before the extras were split off
    m = re.search(r"`pip install hieratok` installs the core only: (.*?)\.", README, re.S)
    assert m, "README's Installing section lists the core"
    assert sorted(norm(d) for d in m.group(1).split(",")) == core


def test_extras_agree_with_the_optional_table_and_the_readme():
    ex = extras()
    for module, (dist, extra) in OPTIONAL.items():
        assert extra is None or norm(dist) in ex[extra], f"{dist} ({module}) is not in [{extra}]"
    named = {norm(dist) for dist, extra in OPTIONAL.values() if extra}
    assert set().union(*ex.values()) - DEV_TOOLS == named  # every package an extra adds has its hint
    assert ex["demo"] >= ex["train"] | ex["eval"]  # the main job also trains and evaluates
    assert ex["all"] == ex["train"] | ex["eval"] | ex["demo"] | ex["diffusers"]
    assert ex["dev"] == ex["all"] | DEV_TOOLS  # the README's setup installs [dev]: the demo and the tests
    section = README.split("### Installing", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \|", section, re.M)
    assert {name for name, _ in rows} == set(ex)
    for name, adds in rows:
        items = [a.strip() for a in adds.split(",")]
        got = set().union(*(ex[a.strip("`")] if a.startswith("`") else {norm(a)} for a in items))
        assert got == ex[name], f"README's [{name}] row"


def test_no_module_imports_an_optional_package_directly():
    found = []
    for f in (ROOT / "src" / "hieratok").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found += [f"{f.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in OPTIONAL]
    assert not found, "import these through hieratok._optional.require:\n" + "\n".join(found)


def test_require_names_the_extra_and_keeps_other_import_errors(monkeypatch, tmp_path):
    assert require("json", "anything") is json
    for name in [m for m in sys.modules if m.split(".")[0] == "webdataset"] + ["webdataset"]:
        monkeypatch.setitem(sys.modules, name, None)  # how Python marks a module that cannot be imported
    with pytest.raises(MissingExtraError) as e:
        require("webdataset.shardlists", "reading tar shards")
    assert str(e.value) == 'reading tar shards needs webdataset, which is not installed: pip install "hieratok[train]"'
    with pytest.raises(MissingExtraError, match=r'pip install "hieratok\[demo\]"$'):
        require("webdataset", "the demo", extra="demo")
    with pytest.raises(MissingExtraError, match="needs hieratok_no_such_pkg, which is not installed: "
                                                "pip install hieratok_no_such_pkg$"):
        require("hieratok_no_such_pkg", "x")
    # an installed package whose own dependency is missing: that error, not a wrong hint
    (tmp_path / "hieratok_fake_pkg").mkdir()
    (tmp_path / "hieratok_fake_pkg" / "__init__.py").write_text("import hieratok_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("hieratok_fake_pkg", "x")
    assert type(e.value) is ModuleNotFoundError and e.value.name == "hieratok_missing_dependency"


DRIVER = textwrap.dedent('''
    import contextlib, io, json, sys

    for name in sys.argv[1].split(","):  # a None entry makes `import name` fail and find_spec return None
        sys.modules[name] = None
    model_dir, image, out = sys.argv[2:5]

    import hieratok
    from hieratok.cli import main

    def cli(*argv):
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                rc = main(list(argv))
            except SystemExit as ex:
                rc = ex.code
        return {"rc": rc, "out": o.getvalue(), "err": e.getvalue().strip().splitlines()[-1:]}

    def error(f):
        try:
            f()
        except Exception as ex:
            return [type(ex).__name__, str(ex)]

    from hieratok.data import EmbeddedPhotos, expand_shard_urls
    from hieratok.report import plot_per_scale_metric

    print(json.dumps({
        "version": hieratok.__version__,
        "--version": cli("--version"),
        "info": cli("info", "tiny"),
        "reconstruct": cli("reconstruct", image, "--checkpoint", model_dir, "--out", out),
        "demo": cli("demo", "--out", out + "/demo", "--steps", "1"),
        "shards": error(lambda: expand_shard_urls(out + "/shard-{0..1}.tar")),
        "plot": error(lambda: plot_per_scale_metric({"a": [1.0, 2.0]}, [8, 16], out + "/p.png", "PSNR")),
        "photos": error(lambda: EmbeddedPhotos("heldout", 32)),
    }))
''')


def test_core_works_without_any_optional_package_and_features_name_their_extra(tmp_path):
    HieraTok.from_preset("tiny", image_size=32, encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(tmp_path / "photo.png")
    r = subprocess.run([sys.executable, "-c", DRIVER, ",".join(OPTIONAL), str(tmp_path / "tok"),
                        str(tmp_path / "photo.png"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["version"] == __version__
    assert res["--version"]["rc"] == 0 and res["--version"]["out"].strip() == f"hieratok {__version__}"
    n = sum(p.numel() for p in HieraTok.from_preset("tiny").parameters())
    assert res["info"]["rc"] == 0 and re.search(rf"total +{n / 1e6:.2f}M", res["info"]["out"]), res["info"]
    assert res["reconstruct"]["rc"] == 0, res["reconstruct"]
    assert any((tmp_path / "out").rglob("*.png")), "reconstruct wrote its images"
    assert res["demo"]["rc"] == 2 and len(res["demo"]["err"]) == 1
    assert res["demo"]["err"][0].startswith("hieratok demo: error: an ablation (")
    assert 'needs scipy, which is not installed: pip install "hieratok[demo]"' in res["demo"]["err"][0]
    assert not (tmp_path / "out" / "demo").exists(), "the demo stopped before writing anything"
    assert res["shards"] == ["MissingExtraError", 'reading tar shards needs webdataset, which is not installed: '
                                                  'pip install "hieratok[train]"']
    assert res["plot"] == ["MissingExtraError", 'plotting needs matplotlib, which is not installed: '
                                                'pip install "hieratok[eval]"']
    assert res["photos"][0] == "ValueError" and res["photos"][1].endswith('pip install "hieratok[demo]"')
