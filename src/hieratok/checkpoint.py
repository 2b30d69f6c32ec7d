"""Training checkpoints: one directory per step, safetensors + JSON, written atomically.

    <run>/checkpoints/step_00001000/
        config.json, model.safetensors    the tokenizer (HieraTok.from_pretrained works on this dir)
        ema.safetensors                   EMA weights (if enabled)
        <name>.safetensors                other trained modules (e.g. disc.safetensors)
        optim.safetensors                 optimizer tensors, keyed by parameter name
        trainer_state.json                step, optimizer param groups, sampler position, counters,
                                          RNG states, the training config

A checkpoint is written to ``.tmp-step_...``, flushed to disk and renamed when complete (a step
saved again moves its old directory aside to ``.old-step_...`` first), so a run killed while saving
leaves no directory that ``latest_checkpoint`` would pick; the last ``keep_last`` are kept.
No pickle is used anywhere.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "latest_checkpoint", "complete_checkpoints", "checkpoint_problem", "load_checkpoint_files",
           "rng_state", "set_rng_state", "flatten_optim", "unflatten_optim", "STATE_NAME"]

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) capturing torch CPU/CUDA, Python and NumPy generators."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def flatten_optim(name: str, sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer full state dict (FQN-keyed) -> tensors for safetensors + JSON param groups."""
    tensors = {}
    for fqn, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{name}|{fqn}|{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def unflatten_optim(name: str, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.count("|") != 2:  # RNG tensors share the file
            continue
        opt, fqn, k = key.split("|")
        if opt == name:
            state.setdefault(fqn, {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_dir_writer: Any,
    weights: dict[str, dict[str, torch.Tensor]],
    optim_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a complete checkpoint directory atomically (call on the main rank only).

    Args:
        model_dir_writer: callable(dir) writing ``config.json`` + ``model.safetensors``.
        weights: extra safetensors files, ``{"ema": {...}, "disc": {...}}``.
        optim_tensors: flattened optimizer tensors and RNG tensors.
        state: JSON-serialisable trainer state.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        model_dir_writer(tmp)
        for name, sd in weights.items():
            save_file(sd, str(tmp / f"{name}.safetensors"))
        save_file(optim_tensors, str(tmp / "optim.safetensors"))
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():  # on disk before the rename makes the directory visible
            _fsync(f)
        _fsync(tmp)
    except BaseException as e:  # a full disk, a kill: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt_root)) from e
        raise
    replaced = None
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first,
        replaced = ckpt_root / f".old-step_{step:08d}-{os.getpid()}"  # so no half-deleted step_* is ever visible
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    if replaced is not None:
        shutil.rmtree(replaced)
    for old in sorted(p for p in ckpt_root.iterdir() if _STEP_RE.match(p.name))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".tmp-step_*"), *ckpt_root.glob(".old-step_*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint directories of a run (renamed into place), newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(done, key=lambda p: p.name, reverse=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint directory of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[0] if done else None


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed from (an unreadable JSON file, or a truncated or corrupt
    safetensors file: the header is read and checked against the file's length), else None. Cheap:
    no tensor is loaded."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    for f in [ckpt / STATE_NAME, *sorted(ckpt.glob("*.json"))]:
        try:
            json.loads(f.read_text())
        except (OSError, ValueError) as e:
            return f"{f.name}: {' '.join(str(e).split())}"
    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            return f"{f.name}: {' '.join(str(e).split()) or type(e).__name__}"
    return None


def load_checkpoint_files(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer state JSON, optimizer + RNG tensors) of a checkpoint directory."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE_NAME).is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no {STATE_NAME})")
    return json.loads((ckpt / STATE_NAME).read_text()), load_file(str(ckpt / "optim.safetensors"))
