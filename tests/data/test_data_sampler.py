"""ResumableDistributedSampler: torch parity, disjoint shards, mid-epoch and elastic resume."""

import itertools

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from hieratok.data import ResumableDistributedSampler


@pytest.mark.parametrize("n,world,shuffle,drop_last,epoch", [
    (10, 3, True, False, 0), (10, 3, True, True, 2), (7, 2, False, False, 0), (2, 4, True, False, 1), (12, 4, True, False, 3),
])
def test_matches_torch_distributed_sampler(n, world, shuffle, drop_last, epoch):
    data = list(range(n))
    for rank in range(world):
        ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        ours = ResumableDistributedSampler(n, num_replicas=world, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        ref.set_epoch(epoch)
        ours.set_epoch(epoch)
        assert list(ours) == list(ref) and len(ours) == len(ref)


def test_disjoint_and_covering():
    shards = [list(ResumableDistributedSampler(12, 3, r, seed=1)) for r in range(3)]
    assert sorted(itertools.chain(*shards)) == list(range(12))
    padded = [list(ResumableDistributedSampler(10, 4, r, seed=1)) for r in range(4)]
    assert set(itertools.chain(*padded)) == set(range(10)) and sum(map(len, padded)) == 12


def test_resume_mid_epoch_yields_exactly_the_rest():
    n, world, bs = 23, 2, 3
    for rank in range(world):
        s = ResumableDistributedSampler(n, world, rank, seed=3)
        s.set_epoch(4)
        full = list(s)
        s.advance(bs)
        s.advance(bs)
        state = s.state_dict()
        resumed = ResumableDistributedSampler(n, world, rank, seed=3)
        resumed.load_state_dict(state)
        resumed.set_epoch(4)  # same epoch: the position is kept
        assert list(resumed) == full[2 * bs :] and len(resumed) == len(full) - 2 * bs
        resumed.set_epoch(5)
        assert resumed.consumed == 0 and len(list(resumed)) == len(full)


def test_resume_through_a_dataloader_reproduces_the_uninterrupted_run():
    data = list(range(50))
    ref_sampler = ResumableDistributedSampler(data, seed=0)
    uninterrupted = [b.tolist() for b in DataLoader(data, batch_size=4, sampler=ref_sampler)]

    sampler = ResumableDistributedSampler(data, seed=0)
    got = []
    for batch in DataLoader(data, batch_size=4, sampler=sampler):
        got.append(batch.tolist())
        sampler.advance(len(batch))
        if len(got) == 5:
            state = sampler.state_dict()
            break
    sampler = ResumableDistributedSampler(data, seed=0)
    sampler.load_state_dict(state)
    got += [b.tolist() for b in DataLoader(data, batch_size=4, sampler=sampler)]
    # batches after the break are re-cut, but the sample stream is identical
    assert list(itertools.chain(*got)) == list(itertools.chain(*uninterrupted))


@pytest.mark.parametrize("n", [29, 30])
def test_elastic_resume_on_more_ranks_loses_and_repeats_nothing(n):
    old = [ResumableDistributedSampler(n, 2, r, seed=9) for r in range(2)]
    consumed = [list(s)[:4] for s in old]
    for s in old:
        s.advance(4)
    state = old[0].state_dict()
    new = []
    for r in range(3):
        s = ResumableDistributedSampler(n, 3, r, seed=9)
        s.load_state_dict(state)
        new.append(list(s))
    seen = list(itertools.chain(*consumed, *new))
    assert set(seen) == set(range(n))
    # only the padding of the re-dealt remainder (to a multiple of 3 ranks) repeats
    assert len(seen) - n == -(n - 8) % 3


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError):
        ResumableDistributedSampler(0)
    with pytest.raises(ValueError):
        ResumableDistributedSampler(10, num_replicas=2, rank=2)
    state = ResumableDistributedSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ResumableDistributedSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="length"):
        ResumableDistributedSampler(11, seed=1).load_state_dict(state)
