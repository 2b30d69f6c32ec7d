"""The machine facts every benchmark result carries (benchmarks/_common.py)."""

import ast
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _common import machine_info  # noqa: E402


def test_machine_info_has_the_cpu_and_library_facts():
    info = machine_info()
    json.dumps(info)  # goes into every JSON result as is
    assert isinstance(info["cpu_isa"], list) and all(isinstance(f, str) for f in info["cpu_isa"])
    assert isinstance(info["bf16_native"], bool)
    assert set(info["torch_build"]) == {"blas", "lapack", "mkl", "onednn"}
    assert info["numpy_blas"] is None or isinstance(info["numpy_blas"], str)


def test_every_benchmark_result_records_machine_info():
    """Each bench_*.py calls machine_info() and writes a result dict with a "machine" entry."""
    for script in sorted(BENCH.glob("bench_*.py")):
        nodes = list(ast.walk(ast.parse(script.read_text())))
        calls = [n for n in nodes if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "machine_info"]
        keyed = [n for n in nodes if isinstance(n, ast.Dict)
                 and any(isinstance(k, ast.Constant) and k.value == "machine" for k in n.keys)]
        assert calls and keyed, f"{script.name}: no {{'machine': machine_info(), ...}} in its result"
