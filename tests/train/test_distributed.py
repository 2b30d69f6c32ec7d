"""Two CPU processes with the gloo backend: DDP keeps ranks identical on disjoint data, and FSDP2
(``fully_shard`` on a CPU device mesh) follows the same trajectory as DDP."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from hieratok.train import Trainer, load_config

FAST = {"model.encoder_depth": 1, "model.decoder_depth": 2, "progress": False, "tensorboard": False,
        "image_every": 0, "log_every": 1, "batch_size": 2, "data.samples_per_epoch": 32, "loss.perceptual": 0.0,
        "steps": 3, "ckpt_every": 0, "optim.grad_accum": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    t = Trainer(load_config(overrides={**FAST, "out_dir": out}))
    seen = list(iter(t.sampler))[: 3 * 4]  # 3 steps x (2 micro-batches of 2) on this rank
    t.fit()
    model = t.wrapped["model"].module
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    torch.save(torch.tensor(seen), f"{out}/seen{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_ranks_see_disjoint_data_and_stay_identical(tmp_path):
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    seen0, seen1 = (set(torch.load(f"{out}/seen{r}.pt").tolist()) for r in (0, 1))
    assert len(seen0) == len(seen1) == 12 and not seen0 & seen1
    w0, w1 = load_file(f"{out}/rank0.safetensors"), load_file(f"{out}/rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # and training moved the weights away from the common initialisation
    assert any(not torch.equal(w0[k], v) for k, v in load_file(f"{out}/checkpoints/step_00000003/ema.safetensors").items())


def _torchrun(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    args = [f"{k}={v}" for k, v in FAST.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "hieratok", "train", "--out", str(out), *extra, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors"))


def test_fsdp2_matches_ddp_through_torchrun(tmp_path):
    ddp = _torchrun(tmp_path, "ddp")
    fsdp = _torchrun(tmp_path, "fsdp", "--fsdp")
    assert set(ddp) == set(fsdp)
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)
