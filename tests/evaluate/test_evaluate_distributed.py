"""Evaluation under two gloo processes equals the single-process result (shards + all-reduce)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hieratok import HieraTok
from hieratok.evaluate import ReconEvalConfig, evaluate_reconstruction, load_tokenizer

CFG = dict(num=6, batch_size=2, perceptual="none", progress=False)


def _worker(rank: int, port: int, tok: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model, _ = load_tokenizer(tok)
    res = evaluate_reconstruction(model, ReconEvalConfig(**CFG))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({k: res[k] for k in ("psnr", "ssim", "rfid", "num_images")}, f)
    torch.distributed.destroy_process_group()


def test_two_ranks_match_one(tmp_path):
    torch.manual_seed(0)
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path / "tok"), str(tmp_path / "r.json")), nprocs=2, join=True,
                       start_method="spawn")
    two = json.loads((tmp_path / "r.json").read_text())
    model, _ = load_tokenizer(tmp_path / "tok")
    one = evaluate_reconstruction(model, ReconEvalConfig(**CFG))
    assert two["num_images"] == one["num_images"] == 6
    for k in ("psnr", "ssim", "rfid"):
        assert two[k] == pytest.approx(one[k], rel=1e-4), k
