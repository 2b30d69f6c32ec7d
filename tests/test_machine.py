"""Machine facts: the ISA flags kept, and the parsing of torch's and NumPy's build records."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from hieratok.machine import ISA_FLAGS, isa_flags, numpy_blas, parse_numpy_blas, parse_torch_build, torch_build_facts

# torch.__config__.show() of an x86 pip wheel (torch 2.13, trimmed)
TORCH_MKL = """PyTorch built with:
  - GCC 13.3
  - C++ Version: 202002
  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605 for Intel(R) 64 architecture applications
  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd69a3df32adcccb623b12cd7baa22)
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - LAPACK is enabled (usually provided by MKL)
  - CPU capability usage: AVX2
  - Build settings: BLAS_INFO=mkl, BUILD_TYPE=Release, CXX_FLAGS= -O2 -fPIC, LAPACK_INFO=mkl, PERF_WITH_AVX=1, \
TORCH_VERSION=2.13.0, USE_CUDA=0, USE_MKL=ON, USE_MKLDNN=ON, USE_OPENMP=ON,
"""
# the same record from an OpenBLAS build (older MKL-DNN spelling, no MKL) and from macOS (neither)
TORCH_OPENBLAS = """PyTorch built with:
  - GCC 11.2
  - Intel(R) MKL-DNN v2.7.3 (Git Hash 0123456789abcdef)
  - LAPACK is enabled (usually provided by MKL)
  - CPU capability usage: NO AVX
  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, LAPACK_INFO=open, TORCH_VERSION=2.1.0, USE_MKL=OFF,
"""
TORCH_MACOS = """PyTorch built with:
  - clang 15.0
  - Build settings: BLAS_INFO=accelerate, BUILD_TYPE=Release, LAPACK_INFO=accelerate, USE_MKL=OFF,
"""


def test_isa_flags_keeps_the_listed_ones_in_order():
    flags = frozenset({"fpu", "sse2", "amx_bf16", "avx2", "avx512_bf16", "fma", "avx512f"})
    assert isa_flags(flags) == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    assert isa_flags(frozenset()) == []
    assert set(isa_flags()) <= set(ISA_FLAGS)  # this machine's


def test_parse_torch_build():
    assert parse_torch_build(TORCH_MKL) == {"blas": "mkl", "lapack": "mkl", "mkl": "2024.2", "onednn": "3.12.0"}
    assert parse_torch_build(TORCH_OPENBLAS) == {"blas": "open", "lapack": "open", "mkl": None, "onednn": "2.7.3"}
    assert parse_torch_build(TORCH_MACOS) == {"blas": "accelerate", "lapack": "accelerate", "mkl": None, "onednn": None}
    assert parse_torch_build("") == {"blas": None, "lapack": None, "mkl": None, "onednn": None}


def test_torch_build_facts_of_this_torch():
    facts = torch_build_facts()
    assert set(facts) == {"blas", "lapack", "mkl", "onednn"}
    assert (facts["mkl"] is not None) == torch.backends.mkl.is_available()
    assert all(v is None or (isinstance(v, str) and v and " " not in v) for v in facts.values())


def test_parse_numpy_blas():
    config = {"Build Dependencies": {"blas": {"name": "scipy-openblas", "found": True, "version": "0.3.27.44.3"},
                                     "lapack": {"name": "scipy-openblas", "found": True, "version": "0.3.27.44.3"}}}
    assert parse_numpy_blas(config) == "scipy-openblas 0.3.27.44.3"
    assert parse_numpy_blas({"Build Dependencies": {"blas": {"name": "accelerate", "version": "unknown"}}}) == "accelerate"
    assert parse_numpy_blas({"Build Dependencies": {"blas": {"name": "openblas", "found": False}}}) is None
    assert parse_numpy_blas({}) is None
    assert numpy_blas() is None or isinstance(numpy_blas(), str)


# one "training step" of allocations: tensors of these MiB, touched, then freed; 48 MiB is above
# glibc's largest moving mmap threshold (32 MiB on 64-bit), so by default it is fresh pages every time
_FAULTS = """
import ctypes, resource, sys, torch
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the system's THP setting
if sys.argv[1] == "keep":
    from hieratok.machine import keep_freed_memory
    assert keep_freed_memory()
sizes = (1, 4, 8, 16, 24, 48)
def step():
    ts = [torch.empty(s << 18).fill_(1.0) for s in sizes]
    del ts
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5 / (sum(sizes) * 256))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_the_page_faults_of_a_repeated_step():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults_per_page(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    # a page fault per page touched (the kernel zero-fills it) by default; none once the memory is kept
    assert faults_per_page("default") > 0.4
    assert faults_per_page("keep") < 0.1


_TRAJECTORY = """
import json, sys, tempfile
import torch
from hieratok.train import Trainer, load_config
torch.set_num_threads(1)
over = {"adapt_threads": False, "keep_freed_memory": sys.argv[1] == "keep", "model.encoder_depth": 1,
        "model.decoder_depth": 2, "progress": False, "tensorboard": False, "image_every": 0, "ckpt_every": 0,
        "diag_every": 0, "log_every": 1, "batch_size": 4, "data.samples_per_epoch": 24, "steps": 4,
        "out_dir": tempfile.mkdtemp() + "/run"}
print(json.dumps([h["loss"] for h in Trainer(load_config(overrides=over)).fit()]))
"""


def test_a_trainer_that_keeps_freed_memory_follows_the_same_trajectory_bit_for_bit():
    # reference path: glibc's defaults; each in a fresh process (the setting is process-wide)
    def losses(mode: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", _TRAJECTORY, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    keep = losses("keep")
    assert len(keep) == 4 and keep == losses("default")  # JSON keeps every bit of a float
