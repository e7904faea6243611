"""LR schedules hit the right values at known steps (warmup as ratio or steps)."""

import math

import pytest
import torch

from fulltune.optim import param_groups, warmup_schedule


def lrs(total: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_schedule(optimizer, total, **kwargs)
    values = []
    for _ in range(total + 1):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_with_warmup_ratio():
    lr = lrs(100, name="cosine", warmup_ratio=0.1)
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5)  # half-way through the cosine
    assert lr[10 + 90 // 4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert lr[100] == pytest.approx(0.0, abs=1e-12)


def test_warmup_ratio_rounds_up_like_hf():
    lr = lrs(100, name="linear", warmup_ratio=0.03)  # ceil(3.0) = 3 warmup steps
    assert lr[3] == pytest.approx(1.0) and lr[2] == pytest.approx(2 / 3)


def test_linear_decay_and_warmup_steps_win_over_ratio():
    lr = lrs(100, name="linear", warmup_ratio=0.5, warmup_steps=20)
    assert lr[20] == pytest.approx(1.0) and lr[60] == pytest.approx(0.5) and lr[100] == 0.0


def test_constant_with_warmup():
    lr = lrs(50, name="constant_with_warmup", warmup_steps=10)
    assert lr[5] == pytest.approx(0.5) and set(lr[10:]) == {1.0}


def test_warmup_stable_decay():
    lr = lrs(100, name="warmup_stable_decay", warmup_steps=10, decay_ratio=0.2, min_lr_ratio=0.1)
    assert lr[10] == pytest.approx(1.0) and lr[80] == pytest.approx(1.0)  # stable until the last 20%
    assert lr[90] == pytest.approx(0.55) and lr[100] == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model.parameters(), weight_decay=0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
