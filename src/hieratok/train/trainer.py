"""The training loop: data, optimisers, parallelism, EMA, logging and checkpoints around a task.

``Trainer(cfg).fit()`` runs on one CPU as well as under ``torchrun`` (DDP, or FSDP2 with
``fsdp=True``). ``train_step`` is the whole update for one batch; everything else is plumbing.

What a run writes to ``metrics.csv`` / TensorBoard, one row per step that logs anything: the
task's logs averaged over ``log_every`` steps (for tokenizers the loss terms, per-scale
``l1_s{size}`` / ``perceptual_s{size}``, ``kl``, the posterior's ``posterior_snr``,
``posterior_snr_median``, ``posterior_std``), ``lr``, ``grad_norm``, ``img_per_s``,
``nonfinite_total``, the task's window logs (VQ training: ``codebook_usage``,
``codebook_perplexity`` of the codes used since the previous row); and every ``diag_every`` steps
the task's held-out diagnostics
(``heldout_psnr_s{size}``, ``heldout_color_err{,_r,_g,_b}``: see :mod:`.diagnostics`). Columns a
step does not log are empty in its row.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .._optional import require
from ..checkpoint import (
    checkpoint_problem,
    complete_checkpoints,
    flatten_optim,
    latest_checkpoint,
    load_checkpoint_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optim,
)
from ..config import architecture_diff, settings_diff
from ..data import BucketBatchSampler, BucketedDataset, ResumableDistributedSampler, collate_drop_none
from ..hub import EMA_NAME, WEIGHTS_NAME, write_model_dir
from ..machine import keep_freed_memory
from .config import TrainConfig, config_dict
from .ema import EMA
from .parallel import (
    DistInfo,
    barrier,
    full_state_dict,
    init_distributed,
    is_fsdp,
    load_full_state_dict,
    unwrap,
    wrap_model,
)
from .tasks import Phase, build_task, param_groups
from .threads import ThreadGovernor, thread_candidates

__all__ = ["Trainer", "lr_at", "NonFiniteLossError", "check_run_dir", "default_num_workers", "RUN_FILES"]

# what a run writes into its folder (and what --overwrite removes: nothing else)
RUN_FILES = ("train_config.yaml", "metrics.csv", "checkpoints", "tb", "images", "wandb.json")
WANDB_RUN = "wandb.json"  # the wandb run's id, name, entity and project: a resumed run continues it


def check_run_dir(run_dir: str | Path, resume: Optional[str], overwrite: bool, remove: bool = True) -> None:
    """Refuse to start a new run in a folder that holds one (its log, config and checkpoints would
    be overwritten or mixed with the new run's): ``resume`` continues it, ``overwrite`` removes the
    old run's files first (when ``remove``: one rank of several removes, every rank checks)."""

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a run folder")
    held = [n for n in RUN_FILES if (run_dir / n).exists()]
    if not held or resume:
        return
    if not overwrite:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}): pass --resume auto to continue it, "
                         "--overwrite to replace it, or choose another --out")
    for n in held if remove else ():
        p = run_dir / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm."""


def lr_at(step: int, total: int, base: float, end: float, warmup_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio * total`` steps, then cosine from ``base`` to ``end``."""
    warm = int(round(warmup_ratio * total))
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * min(1.0, t)))


def default_num_workers(device: torch.device) -> int:
    """Data-loading processes when ``data.num_workers`` is unset: on CUDA min(8, CPUs per rank on
    this node - 1), so decoding keeps up with the GPU; on CPU 0 (workers would take cores from the
    training threads)."""

    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_rank - 1))  # one core left to the rank's main process


def _init_wandb(run_dir: Path, cfg: TrainConfig) -> Any:
    """Start, or continue after a resume, the run's wandb run: its id, name, entity and project live in
    ``<run>/wandb.json`` (written at the first start, removed by ``--overwrite`` with the run)."""

    wandb = require("wandb", "wandb logging (wandb=true)")
    path = run_dir / WANDB_RUN
    saved = json.loads(path.read_text()) if path.is_file() else {}
    run = wandb.init(project=saved.get("project", cfg.wandb_project), entity=saved.get("entity", cfg.wandb_entity),
                     name=saved.get("name", cfg.wandb_name or run_dir.resolve().name), id=saved.get("id"),
                     resume="allow", dir=str(run_dir), config=config_dict(cfg))
    ident = {"id": run.id, "name": run.name, "entity": run.entity, "project": run.project,
             "url": getattr(run, "url", None)}
    if ident != saved:
        path.write_text(json.dumps(ident, indent=2) + "\n")
    return run


class _Logger:
    """CSV + TensorBoard (+ optional wandb) on the main rank.

    ``metrics.csv`` keeps the rows up to ``step`` (the step the run starts or resumes from): rows a
    killed run logged after its last checkpoint are dropped, as the resumed run logs those steps again.
    Images (reconstruction / sample grids) go to TensorBoard and wandb as well as to ``images/``.
    """

    def __init__(self, run_dir: Path, cfg: TrainConfig, main: bool, step: int = 0) -> None:
        self.main, self.path = main, run_dir / "metrics.csv"
        self.fields: Optional[list[str]] = None
        self.tb = self.wandb = None
        if not main:
            return
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields, rows = reader.fieldnames, list(reader)
            keep = [r for r in rows if float(r["step"]) <= step]
            if len(keep) < len(rows):
                with open(self.path, "w", newline="") as f:
                    w = csv.DictWriter(f, self.fields or ["step"], restval="")
                    w.writeheader()
                    w.writerows(keep)
        if cfg.tensorboard:
            try:
                require("tensorboard", "TensorBoard logging")
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError as e:
                log.warning("TensorBoard logging off (tensorboard=false hides this): %s", e)
        if cfg.wandb:
            self.wandb = _init_wandb(run_dir, cfg)

    def write(self, step: int, row: dict[str, float]) -> None:
        if not self.main:
            return
        row = {"step": step, **row}
        new = [k for k in row if k not in (self.fields or [])]
        if new:  # a column appears (e.g. the discriminator starts): rewrite with the wider header
            old_rows = []
            if self.fields is not None and self.path.exists():
                with open(self.path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            self.fields = (self.fields or []) + new
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, self.fields, restval="")
                w.writeheader()
                w.writerows(old_rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, restval="").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def image(self, step: int, path: Path) -> None:
        """Log a grid written to ``path`` under its kind (``recon``, ``samples``: the file name before the step)."""
        if not self.main or (self.tb is None and self.wandb is None):
            return
        tag = path.stem.rsplit("_", 1)[0]
        if self.tb is not None:
            with Image.open(path) as im:
                self.tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            wandb = require("wandb", "wandb logging (wandb=true)")
            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    """Train a tokenizer task from a :class:`TrainConfig`.

    Args:
        cfg: the resolved training config.
        device: override the device (default: CUDA for this local rank if available, else CPU).
        allow_code_execution: accept inputs that run code (``.pt2`` frozen encoders, webdataset
            ``pipe:`` data): the CLI's ``--allow-code-execution``; never from a config file.
        overwrite: let the first :meth:`fit` without ``resume`` replace a run already in
            ``cfg.out_dir`` (otherwise that is a ValueError: see :func:`check_run_dir`).
    """

    def __init__(self, cfg: TrainConfig, device: Optional[str] = None, allow_code_execution: bool = False,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.overwrite, self._fitted = overwrite, False
        self.dist: DistInfo = init_distributed(device)
        self.run_dir = Path(cfg.out_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.task = build_task(cfg, allow_code_execution)
        dev = self.dist.device
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.raw: dict[str, nn.Module] = {k: m.to(dev) for k, m in self.task.modules.items()}
        for m in self.task.frozen_modules():
            m.to(dev)
        self.phases: list[Phase] = self.task.phases()
        self.wrapped: dict[str, nn.Module] = {
            k: wrap_model(m, self.dist, fsdp=cfg.fsdp, compile=cfg.compile,
                          grad_checkpointing=cfg.grad_checkpointing and k == "model", bf16=self.bf16,
                          need_blocks=k == "model")
            for k, m in self.raw.items()
        }
        self.optims = {ph.name: torch.optim.AdamW(param_groups([self.wrapped[k] for k in ph.modules], ph.weight_decay),
                                                  lr=ph.lr, betas=tuple(ph.betas), fused=not cfg.fsdp)
                       for ph in self.phases}
        self.ema = EMA(unwrap(self.wrapped["model"]), cfg.ema_decay) if cfg.ema_decay > 0 else None
        # rank 0 alone cannot run a sharded model (the other ranks would never join its all-gathers)
        self.grids = not (self.task.visualize_runs_model and is_fsdp(self.wrapped["model"]))
        if not self.grids and cfg.image_every > 0 and self.dist.is_main:
            log.warning("sample grids are off under FSDP (sampling the sharded model on rank 0 alone would hang)")
        torch.manual_seed(cfg.seed + 1000 * self.dist.rank)  # different noise (posterior, drop-path) per rank
        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.history: list[dict[str, float]] = []
        self.threads: Optional[ThreadGovernor] = None  # replaceable, e.g. by one shared across runs
        if cfg.keep_freed_memory and dev.type == "cpu":
            keep_freed_memory()
        if cfg.adapt_threads and dev.type == "cpu" and not self.dist.distributed and torch.get_num_threads() > 1:
            self.threads = ThreadGovernor(thread_candidates())
        self._build_data()
        self.diag_x = self._diagnostic_images()

    # ---- set-up -------------------------------------------------------------------------------
    def _build_data(self) -> None:
        c = self.cfg
        self.dataset = self.task.build_dataset(self.dist.rank, self.dist.world_size)
        per_step = c.batch_size * c.optim.grad_accum
        if isinstance(self.dataset, IterableDataset):
            self.sampler = None
        else:
            if len(self.dataset) < per_step * self.dist.world_size:
                raise ValueError(f"dataset has {len(self.dataset)} images, fewer than one global batch "
                                 f"({per_step} x {self.dist.world_size} ranks)")
            self.sampler = ResumableDistributedSampler(self.dataset, self.dist.world_size, self.dist.rank, shuffle=True,
                                                       seed=c.seed, drop_last=True)
        self._iter: Optional[Iterator[Any]] = None
        self.sizes_seen: dict[str, int] = {}  # "HxW" -> images; saved in trainer_state.json

    def _loader(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)  # no-op within the current (possibly resumed) epoch
        per_step = self.cfg.batch_size * self.cfg.optim.grad_accum
        workers = self.cfg.data.num_workers
        if isinstance(self.dataset, BucketedDataset):  # one aspect-ratio bucket per batch
            batching = dict(batch_sampler=BucketBatchSampler(self.sampler, per_step, len(self.dataset.sizes), seed=self.cfg.seed))
        else:
            batching = dict(batch_size=per_step, sampler=self.sampler, drop_last=True)
        dl = DataLoader(self.dataset, **batching, num_workers=default_num_workers(self.dist.device) if workers is None else workers,
                        collate_fn=collate_drop_none, pin_memory=self.dist.device.type == "cuda",
                        # its own generator: creating a loader must not consume the global RNG
                        # (resume equivalence), and worker seeds follow (seed, epoch)
                        generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch))
        return iter(dl)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next (local) batch, a tuple of tensors on the device; a new epoch starts when the data
        runs out. A ValueError when two epochs in a row give no full batch (one may be empty
        legitimately: a run resumed exactly at the end of an epoch)."""
        empty = 0  # consecutive epochs without a batch
        usable = True  # the current epoch gave a batch (an epoch already under way counts as one)
        while True:
            if self._iter is None:
                self._iter, usable = self._loader(), False
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                empty = 0 if usable else empty + 1
                if empty >= 2:
                    raise ValueError(self._no_batch_message()) from None
                continue
            if batch is None:  # every image of the batch was unreadable
                continue
            if self.sampler is not None:
                self.sampler.advance(self.cfg.batch_size * self.cfg.optim.grad_accum)  # local count
            batch = tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
            hw = "x".join(map(str, batch[0].shape[-2:]))
            self.sizes_seen[hw] = self.sizes_seen.get(hw, 0) + batch[0].shape[0]  # this rank's images per size
            return tuple(t.to(self.dist.device, non_blocking=True) for t in batch)

    def _no_batch_message(self) -> str:
        per_step = self.cfg.batch_size * self.cfg.optim.grad_accum
        n = f"{len(self.dataset)} images" if hasattr(self.dataset, "__len__") else "the images"
        return (f"{self.cfg.data.path or 'the embedded photos'}: {n} per epoch on this rank (unreadable ones skipped) "
                f"give no full batch of {per_step} (batch_size x optim.grad_accum): add images or lower batch_size")

    # ---- diagnostics --------------------------------------------------------------------------
    def _rng_devices(self) -> list[int]:
        return [self.dist.device.index or 0] if self.dist.device.type == "cuda" else []

    def _diagnostic_images(self) -> Optional[torch.Tensor]:
        """The task's fixed diagnostic batch on the device (main rank, ``diag_every > 0``), else None."""
        if self.task.diag_every == 0 or not self.dist.is_main:
            return None
        if is_fsdp(self.wrapped["model"]):  # rank 0 alone cannot run the sharded model
            log.warning("held-out diagnostics are off under FSDP "
                        "(running the sharded model on rank 0 alone would hang)")
            return None
        with torch.random.fork_rng(devices=self._rng_devices()):  # building the batch leaves the RNG streams alone
            got = self.task.diagnostic_images()
        if got is None:
            return None
        x, what = got
        log.info("diagnostics every %d steps, with the %s weights, on %s", self.task.diag_every,
                 "EMA" if self.ema is not None else "model's", what)
        return x.to(self.dist.device)

    @contextlib.contextmanager
    def _eval_weights(self) -> Iterator[nn.Module]:
        """The unwrapped model in eval mode with the EMA weights (if any) swapped in; its own weights
        (bit for bit) and mode come back on exit."""
        model = unwrap(self.raw["model"])
        params = [p for p in model.parameters() if p.requires_grad]  # the EMA's order
        saved = [p.detach().clone() for p in params] if self.ema is not None else None
        was = model.training
        try:
            if self.ema is not None:
                self.ema.copy_to(model)
            yield model.eval()
        finally:
            model.train(was)
            if saved is not None:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)

    def diagnose(self) -> dict[str, float]:
        """The task's diagnostics on the fixed batch ({} where there is none): rank 0 only, no
        collectives, no gradients, and the RNG streams, weights and modes as they were, so a run
        follows the same trajectory with diagnostics on or off."""
        if self.diag_x is None:
            return {}
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad(), \
                self._eval_weights() as model, autocast:
            out = self.task.diagnostics(model, self.diag_x)
        if not out:
            return {}
        return dict(zip(out, torch.stack([v.double().reshape(()) for v in out.values()]).tolist()))  # one read

    # ---- the update ---------------------------------------------------------------------------
    @staticmethod
    def _sync_ctx(modules: list[nn.Module], last: bool) -> contextlib.ExitStack:
        """Gradient accumulation: skip the all-reduce on every micro-batch but the last."""
        stack = contextlib.ExitStack()
        for m in modules:
            if is_fsdp(m):
                m.set_requires_gradient_sync(last)
            elif isinstance(m, nn.parallel.DistributedDataParallel) and not last:
                stack.enter_context(m.no_sync())
        return stack

    def _all_finite(self, ok: torch.Tensor) -> bool:
        """Whether ``ok`` (a bool tensor on the device) holds on every rank: the step's one host sync."""
        flag = ok.float().reshape(1)
        if self.dist.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One optimiser update of every phase on ``batch``; returns detached logs and the step's context.

        Every active phase computes its loss and gradients first; the step is applied only if every
        loss and every gradient norm is finite on every rank, otherwise no phase steps and the logs
        hold ``skipped`` (the step is atomic: a failing discriminator phase does not leave a
        generator update behind). Gradients are clipped to ``optim.grad_clip`` (0: norm only).
        """
        c = self.cfg
        ctx: dict[str, Any] = {}
        micro = list(zip(*(t.split(c.batch_size) for t in batch)))
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        pending: list[tuple[Phase, torch.optim.Optimizer, dict[str, torch.Tensor]]] = []
        finite = torch.ones((), dtype=torch.bool, device=self.dist.device)  # read back once, at the end
        for ph in self.phases:
            if not ph.active(self.step):
                continue
            modules, opt = [self.wrapped[k] for k in ph.modules], self.optims[ph.name]
            opt.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            for i, mb in enumerate(micro):
                with self._sync_ctx(modules, i == len(micro) - 1), autocast:
                    out = ph.loss_fn(self.wrapped, mb, ctx, self.step)
                loss = out["loss"]
                finite &= torch.isfinite(loss.detach()).all()
                (loss / len(micro)).backward()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() / len(micro)
            params = [p for m in modules for p in m.parameters() if p.grad is not None]
            gn = torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip if c.optim.grad_clip > 0 else math.inf)
            sums["grad_norm"] = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            finite &= torch.isfinite(sums["grad_norm"]).all()  # a finite loss can still give NaN gradients
            pending.append((ph, opt, sums))
        if not self._all_finite(finite):
            for _, opt, _ in pending:
                opt.zero_grad(set_to_none=True)
            return {"skipped": torch.ones(())}, ctx
        logs: dict[str, torch.Tensor] = {}
        for ph, opt, sums in pending:
            for g in opt.param_groups:
                g["lr"] = lr_at(self.step, c.steps, ph.lr, ph.end_lr, ph.warmup_ratio)
            opt.step()
            logs.update({(k if ph.name == "g" else f"{ph.name}_{k}"): v for k, v in sums.items()})
            logs[f"lr_{ph.name}" if ph.name != "g" else "lr"] = torch.tensor(opt.param_groups[0]["lr"])
        if self.ema is not None:
            self.ema.update(unwrap(self.wrapped["model"]))
        return logs, ctx

    # ---- checkpoints --------------------------------------------------------------------------
    def _last_checkpoint_text(self) -> str:
        last = latest_checkpoint(self.run_dir)
        return (f"the last checkpoint (finite: only finite weights are saved) is {last}" if last is not None
                else "no checkpoint was written before")

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        model_sd = full_state_dict(self.wrapped["model"] if is_fsdp(self.wrapped["model"]) else unwrap(self.wrapped["model"]))
        extra = {k: full_state_dict(m if is_fsdp(m) else unwrap(m)) for k, m in self.wrapped.items() if k != "model"}
        if self.ema is not None:
            extra["ema"] = self.ema.full_state_dict(unwrap(self.wrapped["model"]))
        for k, m in self.task.state_modules().items():
            extra[k] = {n: t.detach().cpu().contiguous() for n, t in m.state_dict().items()}
        bad = [f"{group}.{n}" for group, sd in (("model", model_sd), *extra.items()) for n, t in sd.items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # never write a checkpoint that resuming from would poison (every rank sees the same tensors)
            raise NonFiniteLossError(f"weights became non-finite by step {self.step} ({len(bad)} tensors, e.g. "
                                     f"{bad[0]}): no checkpoint written; {self._last_checkpoint_text()}")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        tensors, groups = {}, {}
        for ph in self.phases:
            osd = get_optimizer_state_dict(self._phase_container(ph), self.optims[ph.name],
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if "state" in osd:  # with cpu_offload, only rank 0 receives the full state
                t, g = flatten_optim(ph.name, osd)
                tensors.update(t)
                groups[ph.name] = g
        rng_t, rng_meta = rng_state()
        path = None
        if self.dist.is_main:
            tensors.update(rng_t)
            state = {"step": self.step, "epoch": self.epoch, "optim_groups": groups,
                     "sampler": self.sampler.state_dict() if self.sampler is not None else None,
                     "ema_updates": self.ema.num_updates if self.ema else 0,
                     "nonfinite_total": self.nonfinite_total, "rng": rng_meta, "train_config": config_dict(self.cfg),
                     "image_sizes_seen": dict(self.sizes_seen)}
            model = unwrap(self.raw["model"])

            path = save_checkpoint(self.run_dir, self.step,
                                   model_dir_writer=lambda d: write_model_dir(d, model, model_sd), weights=extra,
                                   optim_tensors=tensors, state=state, keep_last=self.cfg.keep_last)
            log.info("saved checkpoint %s", path)
        barrier()
        return path

    def _phase_container(self, ph: Phase) -> nn.Module:
        """The modules a phase optimises, under one root (parameter names prefixed by module key)."""
        def pick(k: str) -> nn.Module:
            m = self.wrapped[k]
            return m if is_fsdp(m) else unwrap(m)

        if len(ph.modules) == 1:
            return pick(ph.modules[0])
        return nn.ModuleDict({k: pick(k) for k in ph.modules})

    def _resumable(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from: ``resume`` itself (an error naming the bad file if it is
        damaged), or for ``"auto"`` the newest complete one whose files are intact, with a warning
        naming each newer one that is not (e.g. truncated by a full disk)."""
        if resume != "auto":
            problem = checkpoint_problem(Path(resume))
            if problem:
                raise ValueError(f"checkpoint {resume} is damaged ({problem})")
            return Path(resume)
        for ckpt in complete_checkpoints(self.run_dir):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            log.warning("checkpoint %s is damaged (%s): falling back to the one before it", ckpt, problem)
        return None

    def resume(self, ckpt: Path) -> None:
        """Restore weights, optimizer, EMA, data position, counters and RNG from a checkpoint."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state, tensors = load_checkpoint_files(ckpt)
        model = unwrap(self.raw["model"])
        saved = model.read_config(ckpt)
        diff = architecture_diff(saved, model.config)
        if diff:
            raise ValueError(f"{ckpt} is from another model configuration: {diff}")
        structure = self.task.resume_structure
        changed = settings_diff(structure(state.get("train_config", {})), structure(config_dict(self.cfg)))
        if changed:
            raise ValueError(f"{ckpt} was trained with other modules ({'; '.join(changed)}): resume with its settings, "
                             "or start a new run with init_from=<checkpoint> (e.g. stage 2 from stage 1)")
        target = self.wrapped["model"] if is_fsdp(self.wrapped["model"]) else unwrap(self.wrapped["model"])
        load_full_state_dict(target, load_file(str(Path(ckpt) / WEIGHTS_NAME)))
        for k, m in self.wrapped.items():
            if k != "model":
                load_full_state_dict(m if is_fsdp(m) else unwrap(m), load_file(str(Path(ckpt) / f"{k}.safetensors")))
        for ph in self.phases:
            osd = unflatten_optim(ph.name, tensors, state["optim_groups"][ph.name])
            set_optimizer_state_dict(self._phase_container(ph), self.optims[ph.name], osd,
                                     options=StateDictOptions(full_state_dict=True))
        for k, m in self.task.state_modules().items():
            m.load_state_dict(load_file(str(Path(ckpt) / f"{k}.safetensors")))
        if self.ema is not None and (Path(ckpt) / EMA_NAME).is_file():
            self.ema.load_full_state_dict(unwrap(self.wrapped["model"]), load_file(str(Path(ckpt) / EMA_NAME)),
                                          state["ema_updates"])
        elif self.ema is not None:
            log.info("%s has no EMA weights: the EMA starts from its model weights", ckpt)
            self.ema = EMA(unwrap(self.wrapped["model"]), self.cfg.ema_decay)
        self.step, self.epoch = state["step"], state["epoch"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.sizes_seen = dict(state.get("image_sizes_seen", {}))
        if self.sampler is not None and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])
        self._iter = None
        if self.dist.is_main:
            set_rng_state(tensors, state["rng"])
        else:  # other ranks: keep their own stream, shifted by the step so it is reproducible
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + self.step)
        log.info("resumed from %s (step %d, epoch %d)", ckpt, self.step, self.epoch)

    # ---- images -------------------------------------------------------------------------------
    def _save_images(self, batch: tuple[torch.Tensor, ...], ctx: dict[str, Any], logger: "_Logger") -> None:
        if not self.dist.is_main or not self.grids:
            return
        out = self.run_dir / "images"
        out.mkdir(exist_ok=True)
        for path in self.task.visualize(self.wrapped, batch, ctx, out, self.step) or []:
            logger.image(self.step, path)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, resume: Optional[str] = None, max_steps: Optional[int] = None) -> list[dict[str, float]]:
        """Train until ``cfg.steps`` (or ``max_steps`` more steps); returns the logged rows.

        Args:
            resume: ``"auto"`` (latest complete checkpoint of the run, if any) or a checkpoint path.
            max_steps: stop after this many steps of this call (used to simulate interruptions).
        """
        c = self.cfg
        if not self._fitted:
            check_run_dir(self.run_dir, resume, self.overwrite, remove=self.dist.is_main)
            barrier()
        self._fitted = True
        if resume:
            ckpt = self._resumable(resume)
            if ckpt is not None:
                self.resume(ckpt)
            elif self.dist.is_main:
                log.info("no checkpoint in %s: starting from scratch", self.run_dir)
        if self.dist.is_main:
            (self.run_dir / "train_config.yaml").write_text(yaml.safe_dump(config_dict(c), sort_keys=False))
        logger = _Logger(self.run_dir, c, self.dist.is_main, self.step)
        end = c.steps if max_steps is None else min(c.steps, self.step + max_steps)
        bar = None
        if self.dist.is_main and c.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0)
        acc: dict[str, list[torch.Tensor]] = {}
        t0, imgs, diag_s = time.perf_counter(), 0, 0.0
        for m in self.wrapped.values():
            m.train()
        threads_before = torch.get_num_threads()
        if self.threads is not None:
            self.threads.apply()
        try:
            while self.step < end:
                t_step = time.perf_counter()
                batch = self.next_batch()
                logs, ctx = self.train_step(batch)
                if self.threads is not None:
                    self.threads.step_done(time.perf_counter() - t_step)
                if "skipped" in logs:
                    self.nonfinite_total += 1
                    self.nonfinite_run += 1
                    log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row, %d total)",
                                self.step, self.nonfinite_run, self.nonfinite_total)
                    if self.nonfinite_run >= c.max_nonfinite:  # no save: the last periodic checkpoint stays the latest
                        raise NonFiniteLossError(
                            f"{self.nonfinite_run} consecutive non-finite losses or gradients at step {self.step}: "
                            f"stopping; {self._last_checkpoint_text()}; lower optim.lr or check the data")
                    continue
                self.nonfinite_run = 0
                self.step += 1
                imgs += batch[0].shape[0] * self.dist.world_size
                for k, v in logs.items():
                    acc.setdefault(k, []).append(v)
                row: dict[str, float] = {}
                if self.step % c.log_every == 0 or self.step == end:
                    # every log, averaged over the steps, in one vector: one device-to-host read
                    vec = torch.stack([torch.stack(v).float().mean().to(self.dist.device) for v in acc.values()])
                    if self.dist.distributed:
                        dist.all_reduce(vec)
                        vec = vec / self.dist.world_size
                    row = dict(zip(acc, vec.tolist()))
                    dt = time.perf_counter() - t0 - diag_s  # training throughput: diagnostics time left out
                    row["img_per_s"] = imgs / max(dt, 1e-9)
                    row["nonfinite_total"] = float(self.nonfinite_total)
                    row["threads"] = float(torch.get_num_threads())
                    row.update(self.task.window_logs())  # every rank: it may all-reduce
                    acc, t0, imgs, diag_s = {}, time.perf_counter(), 0, 0.0
                if self.task.diag_every > 0 and (self.step % self.task.diag_every == 0 or self.step == c.steps):
                    t_diag = time.perf_counter()
                    row.update(self.diagnose())  # {} on the other ranks
                    diag_s += time.perf_counter() - t_diag
                if row:  # diagnostics on a step that does not log write a row of their own
                    self.history.append({"step": float(self.step), **row})
                    logger.write(self.step, row)
                    if bar is not None and "loss" in row:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", items_s=f"{row['img_per_s']:.1f}")
                if bar is not None:
                    bar.update(1)
                if c.image_every > 0 and (self.step % c.image_every == 0 or self.step == c.steps):
                    self._save_images(batch, ctx, logger)
                if c.ckpt_every > 0 and self.step % c.ckpt_every == 0 or self.step == c.steps:
                    self.save()
        finally:
            torch.set_num_threads(threads_before)
            if bar is not None:
                bar.close()
            logger.close()
        return self.history
