"""The per-batch plan of sample_to_folder: indices, labels and random source of one batch."""

import torch

from hieratok.workflows.generation import sample_batch


def test_sample_batch_plan_is_a_function_of_run_seed_and_batch_only():
    idx, labels, g = sample_batch(2, num=5, batch_size=2, num_classes=3, seed=7)
    assert idx == [4] and labels.tolist() == [1]  # the last batch is short; labels cycle over the classes
    idx, labels, g = sample_batch(1, num=5, batch_size=2, num_classes=3, seed=7)
    assert idx == [2, 3] and labels.tolist() == [2, 0]
    draw = lambda gen: torch.rand(4, generator=gen)  # noqa: E731
    a = draw(g)
    assert torch.equal(a, draw(sample_batch(1, 5, 2, 3, 7)[2]))  # the same batch again: the same stream
    assert not torch.equal(a, draw(sample_batch(0, 5, 2, 3, 7)[2]))  # another batch
    assert not torch.equal(a, draw(sample_batch(1, 5, 2, 3, 8)[2]))  # another run seed


def test_sample_to_folder_records_no_graph(monkeypatch, tmp_path):
    import pytest

    import hieratok.workflows.generation as gen

    seen = []

    def fake_load(*a, **k):  # the first thing sample_to_folder does: note the grad mode, then stop
        seen.append(torch.is_grad_enabled())
        raise RuntimeError("stop")

    monkeypatch.setattr(gen, "load_model", fake_load)
    with pytest.raises(RuntimeError, match="stop"):
        gen.sample_to_folder("gen", str(tmp_path / "out"))
    assert seen == [False]
