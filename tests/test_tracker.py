"""GradientTracker: what the per-parameter hooks record, driven by real backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch._tracker import GradientTracker


class Hooked:
    """A three-layer model whose parameters feed a GradientTracker, as the watcher wires them."""

    def __init__(self) -> None:
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Linear(2, 1))
        self.params = list(self.model.parameters())
        self.names = [n for n, _ in self.model.named_parameters()]
        self.tracker = GradientTracker(len(self.params))
        self.handles = [
            p.register_post_accumulate_grad_hook(self._hook(i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(self.params)
        ]

    def _hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(param: torch.Tensor) -> None:
            assert param.grad is not None
            self.tracker.on_accumulated(index, param)

        return hook

    def backward(self, x: torch.Tensor | None = None) -> None:
        x = torch.randn(5, 3) if x is None else x
        self.model(x).sum().backward()

    def step(self, indices: list[int] | None = None) -> None:
        indices = list(range(len(self.params))) if indices is None else indices
        self.tracker.on_stepped(indices, [self.params[i].grad for i in indices])

    def index(self, name: str) -> int:
        return self.names.index(name)


@pytest.fixture
def hooked() -> Hooked:
    return Hooked()


def test_initial_state() -> None:
    tracker = GradientTracker(3)
    assert tracker.backward_passes == 0
    assert tracker.received == [False] * 3
    assert tracker.received_count == 0
    assert tracker.stale == [False] * 3
    assert tracker.passes_into == [0] * 3
    assert tracker.first_position == [-1] * 3


def test_one_backward_pass(hooked: Hooked) -> None:
    hooked.backward()
    t = hooked.tracker
    assert t.backward_passes == 1
    assert t.received == [True] * 6
    assert t.received_count == 6
    assert t.passes_into == [1] * 6
    assert t.stale == [False] * 6
    assert t.last_pass == [0] * 6
    # gradients arrive from the loss backwards: the last layer first
    order = sorted(range(6), key=t.arrival.__getitem__)
    layers = [hooked.names[i].split(".")[0] for i in order]
    assert layers[:2] == ["3", "3"]
    assert layers[-2:] == ["0", "0"]
    assert sorted(t.first_position) == list(range(6))
    assert t.first_position[hooked.index("3.weight")] < t.first_position[hooked.index("0.weight")]


def test_passes_accumulate_until_a_step(hooked: Hooked) -> None:
    hooked.backward()
    hooked.backward()
    hooked.backward()
    t = hooked.tracker
    assert t.backward_passes == 3
    assert t.passes_into == [3] * 6
    assert t.stale == [False] * 6
    assert t.last_pass == [2] * 6
    hooked.step()
    assert t.passes_into == [0] * 6


def test_gradient_kept_across_a_step_is_stale(hooked: Hooked) -> None:
    hooked.backward()
    hooked.step()
    hooked.backward()  # no zero_grad
    t = hooked.tracker
    assert t.stale == [True] * 6
    assert t.passes_into == [1] * 6
    hooked.backward()
    assert t.stale == [True] * 6
    assert t.passes_into == [2] * 6


@pytest.mark.parametrize(
    "reset",
    ["set_to_none", "zero_", "foreach_zero_", "model.zero_grad", "zero_grad(set_to_none=False)"],
)
def test_any_reset_between_steps_is_not_stale(hooked: Hooked, reset: str) -> None:
    opt = torch.optim.SGD(hooked.model.parameters(), lr=0.1)
    for _ in range(3):
        grads = [p.grad for p in hooked.params if p.grad is not None]
        if reset == "set_to_none":
            opt.zero_grad()
        elif reset == "zero_":
            for g in grads:
                g.zero_()
        elif reset == "foreach_zero_" and grads:
            torch._foreach_zero_(grads)
        elif reset == "model.zero_grad":
            hooked.model.zero_grad()
        elif reset == "zero_grad(set_to_none=False)":
            opt.zero_grad(set_to_none=False)
        hooked.backward()
        assert hooked.tracker.stale == [False] * 6
        assert hooked.tracker.passes_into == [1] * 6
        opt.step()
        hooked.step()


def test_in_place_change_before_the_step_is_not_a_reset(hooked: Hooked) -> None:
    """Clipping or unscaling before step() changes .grad in place; the step records that."""
    hooked.backward()
    torch.nn.utils.clip_grad_norm_(hooked.model.parameters(), 1e-3)
    hooked.step()
    hooked.backward()
    assert hooked.tracker.stale == [True] * 6


def test_only_stepped_parameters_become_stale(hooked: Hooked) -> None:
    first = [hooked.index("0.weight"), hooked.index("0.bias")]
    hooked.backward()
    hooked.step(first)
    hooked.backward()
    t = hooked.tracker
    assert [t.stale[i] for i in first] == [True, True]
    assert sum(t.stale) == 2
    others = [i for i in range(6) if i not in first]
    assert [t.passes_into[i] for i in others] == [2] * 4


def test_step_without_gradient(hooked: Hooked) -> None:
    hooked.step()  # nothing has a .grad yet
    hooked.backward()
    assert hooked.tracker.stale == [False] * 6


def test_partial_backward_reaches_only_some_parameters(hooked: Hooked) -> None:
    with torch.no_grad():
        h = hooked.model[1](hooked.model[0](torch.randn(5, 3)))
    hooked.model[3](hooked.model[2](h)).sum().backward()
    t = hooked.tracker
    assert t.backward_passes == 1
    assert t.received_count == 4
    assert not t.received[hooked.index("0.weight")]
    assert t.first_position[hooked.index("0.weight")] == -1


def test_tied_parameter_counts_once_per_pass() -> None:
    embedding = nn.Embedding(5, 3)
    tracker = GradientTracker(1)
    embedding.weight.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
        lambda p: tracker.on_accumulated(0, p)
    )
    tokens = torch.tensor([[1, 2, 3]])
    (embedding(tokens) @ embedding.weight.t()).sum().backward()
    assert tracker.backward_passes == 1
    assert tracker.passes_into == [1]


def test_backward_passes_are_counted_per_pass_not_per_hook(hooked: Hooked) -> None:
    for _ in range(4):
        hooked.backward()
    assert hooked.tracker.backward_passes == 4
    assert hooked.tracker.last_pass == [3] * 6


def test_arrival_follows_the_latest_pass(hooked: Hooked) -> None:
    hooked.backward()
    with torch.no_grad():
        h = hooked.model[1](hooked.model[0](torch.randn(5, 3)))
    hooked.model[3](hooked.model[2](h)).sum().backward()
    t = hooked.tracker
    assert t.arrival[hooked.index("3.weight")] > t.arrival[hooked.index("0.weight")]
    assert t.last_pass[hooked.index("0.weight")] == 0
    assert t.last_pass[hooked.index("3.weight")] == 1


def test_state_dict_round_trip(hooked: Hooked) -> None:
    with torch.no_grad():
        h = hooked.model[1](hooked.model[0](torch.randn(5, 3)))
    hooked.model[3](hooked.model[2](h)).sum().backward()
    hooked.backward()
    state = hooked.tracker.state_dict()
    fresh = GradientTracker(6)
    fresh.load_state_dict(state)
    assert fresh.received == hooked.tracker.received
    assert fresh.received_count == 6
    assert fresh.first_position == hooked.tracker.first_position
    assert fresh.backward_passes == 2


def test_state_dict_for_another_model_is_refused(hooked: Hooked) -> None:
    hooked.backward()
    with pytest.raises(ValueError, match="different number of parameters"):
        GradientTracker(5).load_state_dict(hooked.tracker.state_dict())


def test_backward_after_backward_with_no_reader_keeps_a_bounded_backlog(hooked: Hooked) -> None:
    limit = hooked.tracker._replay_at
    for _ in range(limit // len(hooked.params) + 10):
        hooked.backward()
        assert len(hooked.tracker._events) <= limit
    assert hooked.tracker.backward_passes == limit // len(hooked.params) + 10
    assert hooked.tracker.passes_into == [limit // len(hooked.params) + 10] * 6


def test_a_freed_gradient_is_not_mistaken_for_the_next_one(hooked: Hooked) -> None:
    hooked.backward()
    hooked.step()
    for p in hooked.params:
        p.grad = None  # freed before the tracker looked; a new tensor may reuse its address
    hooked.backward()
    assert hooked.tracker.stale == [False] * 6
    assert hooked.tracker.passes_into == [1] * 6
