"""Sequence layouts and the block-causal group mask of next-hierarchy prediction."""

import pytest
import torch

from hieratok.generators.autoregressive import (
    ARObjective,
    ar_layout,
    grouped_layout,
    har_layout,
    har_level_sizes,
    training_batch,
)


def test_restok_layout_matches_the_official_table():
    """N = 128, 4 next-token codes: the sequence of the authors' HAR model, written out by hand."""
    lay = har_layout(128, 4)
    assert lay.group_sizes == (1, 1, 1, 1, 4, 8, 16, 32, 64)
    assert lay.num_steps == 9 and lay.num_tokens == 128
    assert lay.num_placeholders == 63  # 3 + 4 + 8 + 16 + 32; the released table has 127 rows
    V = 1000
    codes = torch.arange(128)[None]  # code i has id i, so inputs show which code sits where
    inputs, targets = training_batch(codes, lay, V)
    ph = lambda a, b: list(range(V + a, V + b))  # noqa: E731 - placeholders a..b-1
    expected = ([0, 1, 2, 3] + ph(0, 3) + list(range(4, 8)) + ph(3, 7) + list(range(8, 16)) + ph(7, 15)
                + list(range(16, 32)) + ph(15, 31) + list(range(32, 64)) + ph(31, 63))
    assert inputs[0].tolist() == expected
    assert torch.equal(targets, codes)


def test_every_group_reads_only_codes_of_earlier_groups():
    for lay in (har_layout(128, 4), har_layout(64, 2), har_layout(16, 1), ar_layout(10)):
        mask = lay.mask.dense()
        for s, e in lay.group_bounds():
            for p in range(max(s, 1), e):
                c = lay.code_index[p - 1]
                assert c < s  # teacher forcing never shows a code the group predicts
                # position p may attend to the position holding the code it reads
                if c >= 0:
                    holder = 1 + lay.code_index.index(c)
                    assert mask[p, holder]


def test_vanilla_layout_is_plain_next_token():
    lay = ar_layout(12)
    codes = torch.randint(0, 50, (3, 12))
    inputs, _ = training_batch(codes, lay, 50)
    assert torch.equal(inputs, codes[:, :-1]) and lay.num_placeholders == 0 and lay.num_steps == 12
    assert torch.equal(lay.mask.dense(), torch.ones(12, 12, dtype=torch.bool).tril())


def test_har_and_vanilla_share_the_first_positions():
    a, h = ar_layout(128), har_layout(128, 4)
    assert torch.equal(a.mask.dense()[:4, :4], h.mask.dense()[:4, :4]) and not h.mask.dense()[:4, 4:].any()
    assert a.code_index[:3] == h.code_index[:3]


def test_bad_layouts():
    with pytest.raises(ValueError, match="power of 2"):
        har_level_sizes(96, 5)
    with pytest.raises(ValueError, match="never shrink"):
        grouped_layout([1, 4, 2])
    with pytest.raises(ValueError, match="class token"):
        grouped_layout([2, 2])
    with pytest.raises(ValueError, match=r"\(B, 128\)"):
        training_batch(torch.zeros(2, 64, dtype=torch.long), har_layout(), 10)


def test_ar_objective_is_validated_once_for_training_and_sampling():
    """The config's objective dict: typos and unknown layouts are errors, not a silent plain AR."""
    assert ARObjective.from_dict({}).sequence_layout(128) == har_layout(128, 4)
    assert ARObjective.from_dict({"layout": "ar"}).sequence_layout(32) == ar_layout(32)
    assert ARObjective.from_dict({"num_ar_tokens": 2}).sequence_layout(32) == har_layout(32, 2)
    for bad, match in [({"layout": "HAR"}, "layout"), ({"layout": "nar"}, "layout"), ({"num_ar_token": 2}, "num_ar_token"),
                       ({"num_tokens": 128}, "num_tokens"), ({"num_ar_tokens": 0}, "num_ar_tokens"),
                       ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"temperature": -1.0}, "temperature"),
                       ({"cfg_schedule": "linear"}, "cfg_schedule")]:
        with pytest.raises(ValueError, match=match):
            ARObjective.from_dict(bad)
    obj = ARObjective.from_dict({"top_p": 0.95, "cfg_schedule": "step-release"})
    assert obj.sampling_kwargs() == {"top_p": 0.95, "cfg_schedule": "step-release"}
    assert obj.sampling_kwargs(top_p=0.5, top_k=None, temperature=0.0) == {"top_p": 0.5, "temperature": 0.0,
                                                                          "cfg_schedule": "step-release"}
    with pytest.raises(ValueError, match="top_p"):
        obj.sampling_kwargs(top_p=2.0)
    assert obj.sampling_kwargs(cfg_schedule="step-release-tokens")["cfg_schedule"] == "step-release-tokens"


def test_codes_outside_the_codebook_are_rejected():
    """Codes in [V, V + placeholders) would otherwise be embedded as placeholders without a word."""
    V, layout = 16, har_layout(8, 2)
    ok = torch.randint(0, V, (2, 8))
    inputs, targets = training_batch(ok, layout, V)
    assert int(inputs.max()) < V + layout.num_placeholders and torch.equal(targets, ok)
    for bad, match in [(ok + V, r"\[0, 16\)"), (ok - V, r"\[0, 16\)"), (ok.float(), "integer")]:
        with pytest.raises(ValueError, match=match):
            training_batch(bad, layout, V)
