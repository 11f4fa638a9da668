"""The hook registry: what gradwatch adds to user objects, and that close() takes it all back."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from torch import nn

import gradwatch
from gradwatch.registry import HookRegistry
from tests.helpers.contract import (
    assert_bit_identical,
    attribute_names,
    hook_counts,
    run_steps,
    weights,
)
from tests.helpers.models import mlp


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# ---------------------------------------------------------------- HookRegistry itself


def test_registry_param_hooks_report_position_and_grad() -> None:
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(2))
    seen: list[tuple[int, torch.Tensor]] = []
    with HookRegistry() as registry:
        registry.add_param_hooks([a, b], lambda i, p: seen.append((i, p.grad.clone())))
        assert len(registry) == 2
        (a.sum() * 2 + b.sum() * 3).backward()
    assert sorted(i for i, _ in seen) == [0, 1]
    grads = dict(seen)
    assert torch.equal(grads[0], torch.full((3,), 2.0))
    assert torch.equal(grads[1], torch.full((2,), 3.0))
    assert len(registry) == 0
    seen.clear()
    a.sum().backward()
    assert seen == []  # removed on exit


def test_registry_step_hooks_on_one_optimizer_and_globally() -> None:
    model, opt = _model_and_optimizer()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    calls: list[tuple[str, torch.optim.Optimizer]] = []
    before = hook_counts(model, opt, other)
    registry = HookRegistry()
    registry.add_step_hooks(
        opt, lambda o, a, k: calls.append(("pre", o)), lambda o, a, k: calls.append(("post", o))
    )
    registry.add_step_hooks(
        None, lambda o, a, k: calls.append(("gpre", o)), lambda o, a, k: calls.append(("gpost", o))
    )
    assert len(registry) == 4
    opt.step()
    other.step()
    assert calls == [
        ("gpre", opt),
        ("pre", opt),
        ("post", opt),
        ("gpost", opt),
        ("gpre", other),
        ("gpost", other),
    ]
    registry.remove()
    registry.remove()  # idempotent
    assert len(registry) == 0
    assert hook_counts(model, opt, other) == before
    calls.clear()
    opt.step()
    other.step()
    assert calls == []


def test_registry_removes_only_its_own_hooks() -> None:
    model, opt = _model_and_optimizer()
    users: list[str] = []
    user_param = next(model.parameters()).register_post_accumulate_grad_hook(
        lambda p: users.append("param")
    )
    user_step = opt.register_step_pre_hook(lambda o, a, k: users.append("step"))
    user_global = torch_optimizer.register_optimizer_step_post_hook(
        lambda o, a, k: users.append("global")
    )
    try:
        before = hook_counts(model, opt)
        with gradwatch.watch(model, opt, on_finding="record"):
            assert hook_counts(model, opt) != before
        assert hook_counts(model, opt) == before
        run_steps(model, opt, 1)
        assert users == ["param", "step", "global"]
    finally:
        user_param.remove()
        user_step.remove()
        user_global.remove()


# ---------------------------------------------------------------- through watch()


@pytest.mark.parametrize("follow", [False, True], ids=["explicit", "follow-all"])
def test_close_restores_exactly_the_hooks_there_were(follow: bool) -> None:
    model, opt = _model_and_optimizer()
    before = hook_counts(model, opt)
    watcher = gradwatch.watch(model, None if follow else opt, on_finding="record")
    during = hook_counts(model, opt)
    n = len(list(model.parameters()))
    assert during.param_post_accumulate == tuple(c + 1 for c in before.param_post_accumulate)
    assert during.param_backward == before.param_backward
    # The forward probe's two hooks on the model, until its first forward passes are seen.
    assert during.module == (before.module[0] + 2, *before.module[1:])
    if follow:
        assert (during.global_pre, during.global_post) == (
            before.global_pre + 1,
            before.global_post + 1,
        )
        assert during.optimizer_pre == before.optimizer_pre
    else:
        assert during.optimizer_pre == tuple(c + 1 for c in before.optimizer_pre)
        assert during.optimizer_post == tuple(c + 1 for c in before.optimizer_post)
        assert (during.global_pre, during.global_post) == (before.global_pre, before.global_post)
    assert n == len(during.param_post_accumulate)
    run_steps(model, opt, 3)
    assert hook_counts(model, opt).module == before.module  # the probe is done: removed
    watcher.close()
    assert hook_counts(model, opt) == before
    watcher.close()  # idempotent
    assert watcher.closed
    assert hook_counts(model, opt) == before


def test_several_optimizers_are_unhooked() -> None:
    model = mlp()
    params = list(model.parameters())
    first = torch.optim.SGD(params[:3], lr=0.01)
    second = torch.optim.Adam(params[3:], lr=0.01)
    before = hook_counts(model, first, second)
    with gradwatch.watch(model, [first, second], on_finding="record") as watcher:
        assert hook_counts(model, first, second).optimizer_pre == (1, 1)
        for _ in range(2):
            first.zero_grad()
            second.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            first.step()
            second.step()
    assert watcher.step == 2
    assert watcher.findings == []
    assert hook_counts(model, first, second) == before


def test_no_attributes_are_written_onto_user_objects() -> None:
    model, opt = _model_and_optimizer()
    before = attribute_names(model, opt)
    module_dicts = [dict(vars(m)) for m in model.modules()]
    with gradwatch.watch(model, opt, log_dir=None, on_finding="record"):
        run_steps(model, opt, 3, zero_grad=False)
        assert attribute_names(model, opt) == before
    assert attribute_names(model, opt) == before
    for m, saved in zip(model.modules(), module_dicts, strict=True):
        assert vars(m).keys() == saved.keys()


def _pickled(model: nn.Module) -> nn.Module:
    copied: nn.Module = pickle.loads(pickle.dumps(model))
    return copied


def _torch_saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.load(buffer, weights_only=False)
    return loaded


def _state_dict_saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = mlp()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize(
    "duplicate",
    [_pickled, copy.deepcopy, _torch_saved, _state_dict_saved],
    ids=["pickle", "deepcopy", "torch.save", "torch.save(state_dict)"],
)
@pytest.mark.parametrize("follow", [False, True], ids=["explicit", "follow-all"])
def test_watched_model_copies_and_the_copy_trains_unwatched(
    duplicate: Callable[[nn.Module], nn.Module], follow: bool
) -> None:
    model, opt = _model_and_optimizer()
    with gradwatch.watch(model, None if follow else opt, on_finding="raise") as watcher:
        run_steps(model, opt, 2)
        twin = duplicate(model)
        assert_bit_identical(weights(twin), weights(model))
        assert hook_counts(twin).param_post_accumulate == (0,) * len(list(twin.parameters()))
        occurrences = watcher.occurrences
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
        # No zero_grad: a watched copy would raise a missing_zero_grad GradientError here.
        run_steps(twin, twin_opt, 4, zero_grad=False)
        assert watcher.step == 2
        assert watcher.occurrences == occurrences
        # The copy is a model of its own: it can be watched while the original is.
        with gradwatch.watch(twin, twin_opt, on_finding="record") as twin_watcher:
            run_steps(twin, twin_opt, 2)
        assert twin_watcher.step == 2
        run_steps(model, opt, 1)
    assert watcher.step == 3
    assert watcher.findings == []


def test_watched_weights_equal_unwatched_twin_bit_for_bit() -> None:
    torch.manual_seed(1)
    watched, watched_opt = _model_and_optimizer()
    plain = copy.deepcopy(watched)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    with gradwatch.watch(watched, watched_opt, on_finding="record") as watcher:
        run_steps(watched, watched_opt, 12, seed=3)
        # a planted bug, found and recorded, still changes nothing about training
        run_steps(watched, watched_opt, 4, seed=4, zero_grad=False)
    run_steps(plain, plain_opt, 12, seed=3)
    run_steps(plain, plain_opt, 4, seed=4, zero_grad=False)
    assert [f.kind.value for f in watcher.findings] == ["missing_zero_grad"]
    assert_bit_identical(weights(watched), weights(plain))
    assert [p.grad for p in watched.parameters()] != [None] * 6
    for a, b in zip(watched.parameters(), plain.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.equal(a.grad, b.grad)
    assert_bit_identical(
        [v for s in watched_opt.state.values() for v in s.values()],
        [v for s in plain_opt.state.values() for v in s.values()],
    )


@pytest.mark.parametrize("follow", [False, True], ids=["explicit", "follow-all"])
def test_after_close_the_model_behaves_exactly_as_unwatched(follow: bool) -> None:
    torch.manual_seed(2)
    model, opt = _model_and_optimizer()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    before = hook_counts(model, opt)
    with gradwatch.watch(model, None if follow else opt, on_finding="raise") as watcher:
        run_steps(model, opt, 5)
    run_steps(twin, twin_opt, 5)
    assert hook_counts(model, opt) == before
    # after close: forward, backward and steps (even buggy ones) as if never watched
    x = torch.randn(16, 8)
    assert torch.equal(model(x), twin(x))
    run_steps(model, opt, 6, seed=9, zero_grad=False)
    run_steps(twin, twin_opt, 6, seed=9, zero_grad=False)
    assert watcher.step == 5
    assert watcher.occurrences == {}
    assert_bit_identical(weights(model), weights(twin))


def test_closed_watcher_keeps_its_results_but_holds_no_parameters() -> None:
    model, opt = _model_and_optimizer()
    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        run_steps(model, opt, 3, zero_grad=False)
    assert watcher.step == 3
    assert [f.kind.value for f in watcher.findings] == ["missing_zero_grad"]
    assert watcher.param_names == [n for n, _ in model.named_parameters()]
    assert "closed" in repr(watcher)
    assert "missing_zero_grad" in watcher.summary()
    state = watcher.state_dict()
    assert state["findings"][0]["kind"] == "missing_zero_grad"
