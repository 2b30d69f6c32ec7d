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

FAST = {"adapt_threads": False,  # fixed threads: trajectories are compared bit for bit
        "model.encoder_depth": 1, "model.decoder_depth": 2, "progress": False, "tensorboard": False,
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


def _tiny_cache(root: str, kind: str, meta: dict = {}, shape: tuple = (4, 4, 4)) -> None:
    """A latent (``shape``) or code (16,) cache of 32 random items with 3 labels."""
    from hieratok.data.latent_cache import finalize_cache, write_cache

    g = torch.Generator().manual_seed(0)
    v = torch.randn(32, *shape, generator=g) if kind == "latents" else torch.randint(0, 32, (32, 16), generator=g)
    write_cache(lambda x: x, [(v[i], i % 3) for i in range(32)], root, kind=kind, progress=False)  # stored as is
    finalize_cache(root, {"codebook_size": 32, **meta} if kind == "codes" else meta)


def _generator_worker(rank: int, world: int, port: int, out: str, task: str, extra: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    over = {"task": task, "preset": "dit-tiny" if task == "dit" else "gpt-tiny", "data.path": f"{out}/cache",
            "out_dir": f"{out}/run", "progress": False, "tensorboard": False, "image_every": 0, "log_every": 1,
            "batch_size": 2, "steps": 2, "ckpt_every": 0, "optim.lr": 1e-2, **extra}
    if task == "dit":
        over["model.depth"] = 1
    t = Trainer(load_config(overrides=over))
    init = {k: v.clone() for k, v in t.raw["model"].state_dict().items()}
    t.fit()
    if not t.cfg.fsdp:  # sharded parameters have no plain storage to save
        save_file({k: v.contiguous() for k, v in t.raw["model"].state_dict().items()}, f"{out}/rank{rank}.safetensors")
    if rank == 0 and not t.cfg.fsdp:
        save_file(init, f"{out}/init.safetensors")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("task", ["dit", "ar"])
def test_generator_tasks_train_under_ddp(tmp_path, task):
    """The DiT / GPT loss functions read ``model.config`` through the DDP wrapper; ranks stay identical."""
    out = str(tmp_path)
    _tiny_cache(f"{out}/cache", "latents" if task == "dit" else "codes")
    mp.start_processes(_generator_worker, args=(2, _free_port(), out, task, {}), nprocs=2, join=True, start_method="spawn")
    w0, w1 = load_file(f"{out}/rank0.safetensors"), load_file(f"{out}/rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], v) for k, v in load_file(f"{out}/init.safetensors").items())


def test_dit_sample_grids_under_fsdp_do_not_hang(tmp_path):
    """Rank 0 alone cannot sample a sharded DiT: grids are switched off instead of waiting forever."""
    from hieratok import HieraTok

    out = str(tmp_path)
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    _tiny_cache(f"{out}/cache", "latents", {"tokenizer": str(tmp_path / "tok")}, shape=(8, 8, 8))
    ctx = mp.start_processes(_generator_worker, args=(2, _free_port(), out, "dit", {"fsdp": True, "image_every": 1,
                             "sample_count": 2, "objective.sampling_steps": 2}), nprocs=2, join=False, start_method="spawn")
    for _ in range(240):  # at most 2 minutes
        if ctx.join(timeout=0.5):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("FSDP training with sample grids did not finish")
    assert (tmp_path / "run/checkpoints/step_00000002").is_dir() and not (tmp_path / "run/images").exists()
