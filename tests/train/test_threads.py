"""The thread governor against a simulated machine whose all-core steps stall while a neighbour runs."""

import pytest

from hieratok.train.threads import ThreadGovernor


class Machine:
    """Step seconds by thread count: 2 threads 1.0 s, 1 thread 1.6 s idle; with a neighbour the
    2-thread step stalls at 30 s and 1 thread slows a little (1.8 s)."""

    def __init__(self):
        self.threads, self.busy, self.now, self.work = 2, False, 0.0, 1.0

    def step(self):
        s = self.work * ((30.0 if self.busy else 1.0) if self.threads == 2 else (1.8 if self.busy else 1.6))
        self.now += s
        return s


def run(machine, gov, steps, busy_from=None, busy_until=None):
    used = []
    for i in range(steps):
        machine.busy = busy_from is not None and busy_from <= i < (busy_until or 10**9)
        used.append(machine.threads)
        gov.step_done(machine.step())
    return used


def governor(m, **kw):
    g = ThreadGovernor((1, 2), clock=lambda: m.now, set_threads=lambda n: setattr(m, "threads", n), **kw)
    g.apply()
    return g


def test_idle_machine_settles_on_all_cores_after_one_probe():
    m = Machine()
    g = governor(m)
    used = run(m, g, 100)
    assert used[:6] == [1, 1, 1, 2, 2, 2]  # one thread first (it never stalls), then all cores
    assert g.current == 2 and set(used[6:]) == {2}
    assert g.switches == []


def test_neighbour_arriving_costs_at_most_a_few_stalled_steps():
    m = Machine()
    g = governor(m)
    used = run(m, g, 60, busy_from=20)
    stalled = [i for i, n in enumerate(used) if n == 2 and i >= 20]
    assert len(stalled) <= g.probe_steps  # detected from the median of the last probe_steps steps
    assert g.current == 1 and g.switches == [(2, 1)]


def test_busy_from_the_start_measures_the_stalled_count_for_one_step_only():
    m = Machine()
    g = governor(m)
    used = run(m, g, 40, busy_from=0)
    assert used[:4] == [1, 1, 1, 2] and set(used[4:40]) == {1}
    assert g.current == 1 and g.speed[2] == 30.0


def test_neighbour_leaving_is_noticed_at_a_routine_check_with_backoff():
    m = Machine()
    g = governor(m, recheck_s=60.0)
    run(m, g, 30, busy_from=0)
    assert g.current == 1
    run(m, g, 200)  # idle now: the next routine check finds 2 threads faster again
    assert g.current == 2 and (1, 2) in g.switches
    assert g.recheck_s > 60.0  # routine checks back off


def test_known_speeds_skip_the_first_probe_and_bad_candidates_are_refused():
    m = Machine()
    g = governor(m, speeds={1: 1.6, 2: 1.0})
    assert not g.probing and g.current == 2 and m.threads == 2
    with pytest.raises(ValueError, match="positive"):
        ThreadGovernor((0, 2))


def test_trainer_reports_each_step_to_its_governor_and_restores_the_thread_count(tmp_path):
    import torch

    from hieratok.train import Trainer, load_config

    over = {"model.encoder_depth": 1, "model.decoder_depth": 1, "progress": False, "tensorboard": False,
            "image_every": 0, "ckpt_every": 0, "log_every": 1, "batch_size": 2, "loss.perceptual": 0.0,
            "diag_every": 0, "steps": 3}
    before = torch.get_num_threads()
    t = Trainer(load_config(overrides={**over, "out_dir": str(tmp_path / "a")}))
    assert (t.threads is not None) == (before > 1)
    assert Trainer(load_config(overrides={**over, "adapt_threads": False, "out_dir": str(tmp_path / "b")})).threads is None

    class Recorder:
        seconds, applied = [], 0

        def apply(self):
            self.applied += 1
            torch.set_num_threads(1)

        def step_done(self, s):
            self.seconds.append(s)
            assert torch.get_num_threads() == 1  # the count the governor set is the one in use

    t.threads = rec = Recorder()
    rows = t.fit()
    assert rec.applied == 1 and len(rec.seconds) == 3 and all(s > 0 for s in rec.seconds)
    assert [r["threads"] for r in rows] == [1.0, 1.0, 1.0]
    assert torch.get_num_threads() == before  # fit leaves the process as it found it


def test_a_new_workload_is_measured_again_without_a_false_alarm():
    m = Machine()
    g = governor(m, speeds={1: 1.6, 2: 1.0})
    run(m, g, 5)
    g.new_workload()  # the next model's step is 3x heavier: not a slowdown of the machine
    m.work = 3.0
    used = run(m, g, 20)
    assert set(used) == {2} and g.switches == [] and g.speed == {1: pytest.approx(4.8), 2: pytest.approx(3.0)}
