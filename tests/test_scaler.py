import random
import warnings

import pytest
import torch

from vlamp import DynamicLossScaler, StaticLossScaler, VlampError
from vlamp.precision.scaler import NoLossScaler, make_scaler


def test_defaults_are_pytorchs():
    s = DynamicLossScaler()
    g = torch.amp.GradScaler("cpu")
    assert s.scale == g.get_scale() == 2.0**16
    assert s.growth_factor == g.get_growth_factor() == 2.0
    assert s.backoff_factor == g.get_backoff_factor() == 0.5
    assert s.growth_interval == g.get_growth_interval() == 2000
    assert (s.min_scale, s.max_scale, s.hysteresis) == (None, None, 1)


def test_growth_then_backoff_step_by_step():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    trace = []
    for found in [False, False, False, False, True, False, False, False]:
        s.update(found)
        trace.append((s.scale, s.growth_tracker))
    assert trace == [(8, 1), (8, 2), (16, 0), (16, 1), (8, 0), (8, 1), (8, 2), (16, 0)]
    assert s.skipped_steps == 1


def test_hysteresis_tolerates_overflows_until_growth_restores_it():
    s = DynamicLossScaler(init_scale=64.0, growth_interval=2, hysteresis=3)
    s.update(True)
    s.update(True)
    assert s.scale == 64 and s.hysteresis_left == 1  # two overflows tolerated
    s.update(True)
    assert s.scale == 32  # the third backs off
    s.update(True)
    assert s.scale == 16  # and, until growth, every further one does (DeepSpeed's rule)
    s.update(False)
    s.update(False)
    assert s.scale == 32 and s.hysteresis_left == 3
    s.update(True)
    assert s.scale == 32
    assert s.skipped_steps == 5


def test_min_and_max_scale_bound_and_never_abort():
    s = DynamicLossScaler(init_scale=4.0, growth_interval=1, min_scale=1.0, max_scale=16.0)
    for _ in range(5):
        s.update(False)
    assert s.scale == 16.0  # clamped at max
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            s.update(True)
    assert s.scale == 1.0
    assert s.skips_at_min_scale == 4  # 16 -> 8 -> 4 -> 2 -> 1, then four more overflows at 1
    assert s.skipped_steps == 8
    assert len([w for w in caught if "min_scale" in str(w.message)]) == 1  # warned once


def test_backoff_lands_on_min_scale_exactly():
    s = DynamicLossScaler(init_scale=3.0, min_scale=2.0)
    s.update(True)
    assert s.scale == 2.0 and s.skips_at_min_scale == 0


def _run_sequence(ours, theirs, pattern, param):
    opt = torch.optim.SGD([param], lr=0.0)
    trace_ours, trace_theirs = [], []
    for bad in pattern:
        param.grad = torch.tensor([float("inf") if bad else 1.0])
        # ours: unscale + check + update
        grad = param.grad.clone() * ours.scale
        found = ours.unscale_([grad])
        trace_ours.append((ours.scale, found))
        ours.update(found)
        # torch.amp.GradScaler: its documented loop
        trace_theirs.append((theirs.get_scale(), bad))
        loss = (param * 0).sum()
        theirs.scale(loss)
        param.grad = torch.tensor([float("inf") if bad else 1.0])
        theirs.step(opt)
        theirs.update()
    return trace_ours, trace_theirs


@pytest.mark.parametrize(("kwargs", "steps", "p_bad"), [
    ({}, 4500, 0.0005),                      # PyTorch's defaults, long enough to grow twice
    ({"growth_interval": 3}, 600, 0.2),      # many transitions both ways
])
def test_scale_and_skip_sequence_equals_torch_gradscaler(kwargs, steps, p_bad):
    rng = random.Random(1234)
    pattern = [rng.random() < p_bad for _ in range(steps)]
    pattern[:3] = [True, False, True]
    ours = DynamicLossScaler(**kwargs)
    theirs = torch.amp.GradScaler("cpu", **kwargs)
    param = torch.nn.Parameter(torch.zeros(1))
    a, b = _run_sequence(ours, theirs, pattern, param)
    assert a == b
    assert len({s for s, _ in a}) > 2  # the scale really moved


def test_state_round_trip_keeps_every_non_default_field():
    s = DynamicLossScaler(init_scale=1024.0, growth_factor=4.0, backoff_factor=0.25,
                          growth_interval=7, min_scale=2.0, max_scale=2.0**20, hysteresis=3)
    for found in [True, False, False, True, True, True, False]:
        s.update(found)
    state = s.state_dict()
    fresh = DynamicLossScaler()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert set(state) == {"scale", "init_scale", "growth_factor", "backoff_factor",
                          "growth_interval", "min_scale", "max_scale", "hysteresis",
                          "growth_tracker", "hysteresis_left", "skipped_steps",
                          "skips_at_min_scale"}
    # and the restored scaler behaves the same from here on
    for found in [False] * 7 + [True, True, True, True]:
        s.update(found)
        fresh.update(found)
        assert fresh.state_dict() == s.state_dict()
    st = StaticLossScaler(128.0)
    st2 = StaticLossScaler()
    st2.load_state_dict(st.state_dict())
    assert st2.scale == 128.0


def test_unscale_checks_every_dtype_group():
    s = StaticLossScaler(4.0)
    a = torch.tensor([4.0, 8.0])
    b = torch.tensor([8.0], dtype=torch.bfloat16)
    assert s.unscale_([a, b]) is False
    assert a.tolist() == [1.0, 2.0] and b.item() == 2.0
    c = torch.tensor([float("nan")], dtype=torch.bfloat16)
    assert s.unscale_([torch.tensor([1.0]), c]) is True
    assert NoLossScaler().unscale_([torch.tensor([float("inf")])]) is True


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"init_scale": 0}, "init_scale must be a positive"),
    ({"init_scale": -1.0}, "init_scale must be a positive"),
    ({"init_scale": float("inf")}, "init_scale must be a positive"),
    ({"growth_factor": 1.0}, "growth_factor must be > 1"),
    ({"backoff_factor": 1.5}, r"backoff_factor must be in \(0, 1\)"),
    ({"growth_interval": 0}, "growth_interval must be an integer >= 1"),
    ({"hysteresis": 0}, "hysteresis must be an integer >= 1"),
    ({"min_scale": -2.0}, "min_scale must be a positive"),
    ({"min_scale": 8.0, "max_scale": 4.0}, "min_scale 8.0 > max_scale 4.0"),
])
def test_bad_scaler_arguments(kwargs, fragment):
    with pytest.raises(VlampError, match=f"DynamicLossScaler: {fragment}"):
        DynamicLossScaler(**kwargs)


def test_bad_static_scale_and_scaler_name():
    with pytest.raises(VlampError, match="StaticLossScaler: scale"):
        StaticLossScaler(0.0)
    with pytest.raises(VlampError, match="legal: dynamic, static, none"):
        make_scaler("adaptive")
