import math

import pytest

from midtrain.config.schedules import LRSchedule, lr_at
from midtrain.errors import MidtrainError

T, BASE, MIN = 100, 1.0, 0.1


def curve(schedule: LRSchedule, max_steps: int = T, base_lr: float = BASE) -> list[float]:
    return [lr_at(s, max_steps, base_lr, schedule) for s in range(max_steps)]


def is_nonincreasing(values: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_warmup_is_linear_from_first_step_to_base_lr():
    lrs = curve(LRSchedule("cosine", warmup_steps=10, min_lr=MIN))
    assert lrs[:10] == pytest.approx([0.1 * (s + 1) for s in range(10)])
    assert lrs[9] == BASE


def test_cosine_key_steps():
    lrs = curve(LRSchedule("cosine", warmup_steps=10, min_lr=MIN))
    assert lrs[10] == pytest.approx(MIN + (BASE - MIN) * 0.5 * (1 + math.cos(math.pi / 90)))
    assert lrs[54] == pytest.approx((BASE + MIN) / 2)  # halfway through the decay: t = 55 = 10 + 90 / 2
    assert lrs[99] == pytest.approx(MIN)
    assert is_nonincreasing(lrs[9:])
    assert min(lrs[9:]) >= MIN - 1e-12


def test_linear_key_steps():
    lrs = curve(LRSchedule("linear", warmup_steps=10, min_lr=MIN))
    assert lrs[9] == BASE
    assert lrs[54] == pytest.approx((BASE + MIN) / 2)
    assert lrs[99] == pytest.approx(MIN)
    steps = [b - a for a, b in zip(lrs[9:], lrs[10:])]
    assert steps == pytest.approx([-(BASE - MIN) / 90] * 90)


def test_constant_after_warmup_ignores_min_lr():
    lrs = curve(LRSchedule("constant", warmup_steps=4, min_lr=MIN))
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == [BASE] * 96


@pytest.mark.parametrize(
    "shape, mid",
    [("linear", (BASE + MIN) / 2), ("cosine", (BASE + MIN) / 2), ("1-sqrt", MIN + (BASE - MIN) * (1 - math.sqrt(0.5)))],
)
def test_wsd_warmup_stable_decay(shape, mid):
    lrs = curve(LRSchedule("wsd", warmup_steps=10, min_lr=MIN, decay_fraction=0.2, decay_shape=shape))
    assert lrs[9:80] == [BASE] * 71  # stable through t = 80 = max_steps - decay
    assert lrs[80] < BASE
    assert lrs[89] == pytest.approx(mid)  # t = 90: halfway through the 20 decay steps
    assert lrs[99] == pytest.approx(MIN)
    assert is_nonincreasing(lrs[9:])


def test_wsd_default_decay_is_last_tenth():
    lrs = curve(LRSchedule("wsd", min_lr=MIN))
    assert lrs[:90] == [BASE] * 90
    assert lrs[90] < BASE
    assert lrs[99] == pytest.approx(MIN)


def test_wsd_decay_steps_equals_fraction():
    by_steps = curve(LRSchedule("wsd", warmup_steps=5, decay_steps=30, min_lr=MIN))
    by_fraction = curve(LRSchedule("wsd", warmup_steps=5, decay_fraction=0.3, min_lr=MIN))
    assert by_steps == by_fraction


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_fraction_equals_steps(name):
    # 0.29 * 100 = 28.999...; the fraction must round to 29 steps, not truncate to 28
    by_fraction = curve(LRSchedule(name, warmup_fraction=0.29, min_lr=MIN))
    by_steps = curve(LRSchedule(name, warmup_steps=29, min_lr=MIN))
    assert by_fraction == by_steps
    assert by_steps[28] == BASE and by_steps[27] < BASE


def test_no_warmup_starts_at_base_lr():
    assert lr_at(0, T, BASE, LRSchedule("constant")) == BASE
    assert lr_at(0, T, BASE, LRSchedule("wsd")) == BASE
    assert lr_at(0, T, BASE, LRSchedule("cosine")) == pytest.approx(BASE, rel=1e-3)
    assert lr_at(T - 1, T, BASE, LRSchedule("cosine")) == 0.0


def test_lr_depends_only_on_step_and_plan():
    schedule = LRSchedule("cosine", warmup_steps=100, min_lr=3e-5)
    full = curve(schedule, max_steps=1000, base_lr=3e-4)
    # a resumed run asks for the remaining steps only; the answers are the same values
    assert [lr_at(s, 1000, 3e-4, schedule) for s in range(400, 1000)] == full[400:]


def test_describe_names_the_phases():
    text = LRSchedule("wsd", warmup_steps=10, decay_steps=20, min_lr=MIN, decay_shape="1-sqrt").describe(BASE, T)
    assert text == (
        "wsd: warmup 10 steps to 1, stable until step 80, then 1-sqrt decay to 0.1 over the last 20 of 100 steps"
    )
    assert LRSchedule().describe(3e-4, 10) == "cosine: no warmup, start at 0.0003, then cosine decay to 0 by step 10"


@pytest.mark.parametrize(
    "schedule, max_steps, base_lr, message",
    [
        (LRSchedule(warmup_steps=5, warmup_fraction=0.1), T, BASE, "not both"),
        (LRSchedule(warmup_steps=100), T, BASE, "warmup (100 steps) must be shorter than max_steps (100)"),
        (LRSchedule(warmup_fraction=1.0), T, BASE, "warmup_fraction must be in [0, 1)"),
        (LRSchedule(warmup_steps=-1), T, BASE, "warmup_steps must be >= 0"),
        (LRSchedule(min_lr=-1e-5), T, BASE, "min_lr must be >= 0"),
        (LRSchedule(min_lr=2.0), T, BASE, "min_lr (2.0) must not exceed the base learning rate (1.0)"),
        (LRSchedule(), T, 0.0, "base learning rate must be > 0"),
        (LRSchedule(), 0, BASE, "max_steps must be >= 1"),
        (LRSchedule("cosine", decay_fraction=0.2), T, BASE, "only used by name=wsd"),
        (LRSchedule("wsd", decay_steps=10, decay_fraction=0.1), T, BASE, "decay_steps or decay_fraction, not both"),
        (LRSchedule("wsd", decay_steps=0), T, BASE, "decay_steps must be >= 1"),
        (LRSchedule("wsd", decay_fraction=1.5), T, BASE, "decay_fraction must be in (0, 1]"),
        (LRSchedule("wsd", warmup_steps=50, decay_steps=60), T, BASE, "warmup (50) + decay (60) steps exceed"),
        (LRSchedule("exponential"), T, BASE, "valid names are ['cosine', 'wsd', 'linear', 'constant']"),
        (LRSchedule("wsd", decay_shape="step"), T, BASE, "valid shapes are ['linear', 'cosine', '1-sqrt']"),
    ],
)
def test_nonsense_is_a_clear_error(schedule, max_steps, base_lr, message):
    with pytest.raises(MidtrainError) as err:
        lr_at(0, max_steps, base_lr, schedule)
    assert message in str(err.value)


@pytest.mark.parametrize("step", [-1, T])
def test_step_outside_the_run_is_an_error(step):
    with pytest.raises(MidtrainError, match=r"outside the run's steps \[0, 100\)"):
        lr_at(step, T, BASE, LRSchedule())


def test_parses_as_a_jsonargparse_group():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--lr_schedule", type=LRSchedule, default=LRSchedule())
    args = parser.parse_args(["--lr_schedule.name=wsd", "--lr_schedule.decay_fraction=0.2"])
    schedule = parser.instantiate_classes(args).lr_schedule
    assert schedule == LRSchedule(name="wsd", decay_fraction=0.2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr_schedule.name=exponential"])
