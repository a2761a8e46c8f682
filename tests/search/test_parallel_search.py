"""The parallel (k-point refinement) strategy on synthetic curves: it finds the grid's best value, in fewer rounds
than golden section needs trials; several workers replaying it on shared results see the same rounds; and the
trial log's own module."""
from __future__ import annotations

import math

import pytest

from lib.errors import UserError
from lib.search.strategies import pending_values, search_beta
from lib.search.trial_log import valid_log_record

STEP = 0.002
SHAPES = {
    "quadratic": lambda b, o: 10 + 5e3 * (b - o) ** 2,
    "v_shape": lambda b, o: 10 + 50 * abs(b - o),
    "lopsided": lambda b, o: 10 + (300 * (b - o) if b > o else 15 * (o - b)),
    "explodes": lambda b, o: 9 + math.exp(min(700.0, 2500 * abs(b - o))),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("where", [0.0, 0.13, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", [10, 37, 100])
def test_parallel_finds_the_grid_best_in_fewer_rounds_than_golden_takes_trials(shape, where, num_steps):
    beta_hi = num_steps * STEP
    optimum = round(where * num_steps + 0.3) * STEP + 0.0003  # just off a grid point: no ties
    objective = lambda b: SHAPES[shape](b, optimum)  # noqa: E731
    grid = search_beta(objective, beta_hi, strategy="grid", step=STEP, include_zero=True, progress=False)
    golden = search_beta(objective, beta_hi, strategy="golden", step=STEP, progress=False)
    for points in (2, 3, 4, 8):
        seen = []
        parallel = search_beta(lambda b: seen.append(b) or objective(b), beta_hi, strategy="parallel", step=STEP,
                               points=points, progress=False)
        assert parallel.best_beta == grid.best_beta, (points, parallel.trials)
        assert len(set(seen)) == len(seen) and 0.0 in seen and all(0 <= b <= beta_hi + 1e-12 for b in seen)
        assert parallel.rounds <= golden.num_trials
        if points >= 4:
            assert parallel.rounds <= golden.num_trials / 2
        rounds = [t["beta"] for t in parallel.trials]
        assert len(rounds) <= points * parallel.rounds  # never more than k values a round


def test_k_workers_replaying_the_plan_share_its_rounds():
    """k simulated workers: each round every worker asks what is missing, takes a value no one has taken, and
    they all finish before the next round. They evaluate exactly the one-process trials, k at a time."""
    beta_hi, k = 60 * STEP, 4
    objective = lambda b: SHAPES["lopsided"](b, 0.0371)  # noqa: E731
    alone = search_beta(objective, beta_hi, strategy="parallel", step=STEP, points=k, progress=False)
    finished: dict[float, float] = {}
    steps = 0
    while (missing := pending_values(finished, beta_hi, "parallel", STEP, points=k)) is not None:
        taken = []
        for _worker in range(k):
            free = [v for v in pending_values(finished, beta_hi, "parallel", STEP, points=k) if v not in taken]
            if free:
                taken.append(free[0])
        assert sorted(taken) == sorted(missing)  # the k workers cover the round
        finished.update({v: objective(v) for v in taken})
        steps += 1
    assert steps == alone.rounds
    assert sorted(finished) == sorted(t["beta"] for t in alone.trials)
    assert min(finished, key=finished.get) == alone.best_beta


def test_pending_values_replays_golden_and_grid_too():
    objective = lambda b: SHAPES["quadratic"](b, 0.011)  # noqa: E731
    golden = search_beta(objective, 0.02, strategy="golden", step=STEP, progress=False)
    known = {}
    while (missing := pending_values(known, 0.02, "golden", STEP)) is not None:
        known.update({v: objective(v) for v in missing})
    assert sorted(known) == sorted(t["beta"] for t in golden.trials)
    grid = pending_values({}, 0.02, "grid", STEP, include_zero=True)
    assert grid == [round(i * STEP, 10) for i in range(11)]
    assert pending_values(lambda v: 5.0, 0.02, "grid", STEP) is None  # every value known: complete


@pytest.mark.parametrize("kwargs", [{"points": 1}, {"strategy": "random"}])
def test_bad_parallel_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        search_beta(lambda b: 1.0, 0.02, progress=False, **{"strategy": "parallel", **kwargs})


def test_trial_log_records_are_validated():
    assert valid_log_record({"beta": 0.004, "ppl": 12.0, "seconds": 1.5})
    assert valid_log_record({"beta": 0.0, "ppl": None})  # a diverged trial
    for bad in ({"beta": -0.1, "ppl": 12.0}, {"beta": 0.01, "ppl": 0.5}, {"beta": 0.01, "ppl": 12.0, "seconds": -1},
                {"beta": True, "ppl": 12.0}, {"beta": 0.01, "ppl": float("nan")}):
        assert not valid_log_record(bad), bad
