"""Healthy training loops: every one of them must finish without a single finding."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from tests.helpers.lightning_fit import fit, loader
from tests.helpers.models import (
    GAN,
    EncoderDecoder,
    LSTMRegressor,
    ResidualMLP,
    TiedLM,
    TransformerRegressor,
    TwoHead,
    cnn_bn,
    mlp,
    regression_batch,
    sequence_batch,
    train,
    weights,
)


def _data() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def test_mlp_sgd() -> None:
    model = mlp()
    watcher = train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=40)
    assert watcher.findings == []
    assert watcher.step == 40


def test_cnn_batchnorm_sgd_momentum() -> None:
    model = cnn_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _data()
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()

    def step(i: int) -> None:
        batch = slice((i % 4) * 16, (i % 4 + 1) * 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []


def test_transformer_adamw_clipping_and_warmup() -> None:
    model = TransformerRegressor()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    g = _data()

    def step(_: int) -> None:
        x, y = sequence_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

    watcher = train(model, opt, steps=40, step_fn=step)
    assert watcher.findings == []


def test_lstm_adam() -> None:
    model = LSTMRegressor()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = _data()

    def step(_: int) -> None:
        x, y = sequence_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []


@pytest.mark.parametrize(
    ("steps", "options"),
    [(20, {}), (10, {"no_step_after": 1})],
    ids=["default", "step_not_taken-limit-of-one-window"],
)
def test_declared_accumulation(steps: int, options: dict[str, Any]) -> None:
    """Four passes per step, declared. With ``no_step_after=1`` the limit of step_not_taken is
    ``1 * 4``: undeclared, the third pass would begin with more than one before it."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    k = 4

    def step(_: int) -> None:
        for _micro in range(k):
            x, y = regression_batch(batch=8, generator=g)
            (nn.functional.mse_loss(model(x), y) / k).backward()
        opt.step()
        opt.zero_grad()

    watcher = train(model, opt, steps=steps, step_fn=step, accumulation_steps=k, **options)
    assert watcher.findings == []
    assert watcher.step == steps


def _zeroing_loop(zero: str) -> gradwatch.Watcher:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _data()

    def step(_: int) -> None:
        if zero == "set_to_none=False":
            opt.zero_grad(set_to_none=False)
        elif zero == "model.zero_grad()":
            model.zero_grad()
        elif zero == "foreach_zero_":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        x, y = regression_batch(generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return train(model, opt, steps=25, step_fn=step)


def test_zero_grad_set_to_none_false() -> None:
    assert _zeroing_loop("set_to_none=False").findings == []


def test_model_zero_grad() -> None:
    assert _zeroing_loop("model.zero_grad()").findings == []


def test_foreach_zero_on_grads() -> None:
    assert _zeroing_loop("foreach_zero_").findings == []


def test_frozen_layers() -> None:
    model = mlp(depth=4)
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    watcher = train(model, opt, steps=30)
    assert watcher.findings == []
    assert "0.weight" not in watcher.param_names


def test_layer_frozen_after_watch_started() -> None:
    model = EncoderDecoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    watcher = train(model, opt, steps=30)
    assert watcher.findings == []


def test_two_optimizers_each_owning_part_of_the_model() -> None:
    model = EncoderDecoder()
    opt_enc = torch.optim.SGD(model.encoder.parameters(), lr=0.05, momentum=0.9)
    opt_dec = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    g = _data()
    with gradwatch.watch(model, [opt_enc, opt_dec], on_finding="record") as watcher:
        for _ in range(30):
            x, y = regression_batch(generator=g)
            opt_enc.zero_grad()
            opt_dec.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt_enc.step()
            opt_dec.step()
    assert watcher.findings == []
    assert watcher.step == 30


def test_bf16_autocast_on_cpu() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        nn.functional.mse_loss(out.float(), y).backward()
        opt.step()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []


def test_tied_embedding_and_output_weights() -> None:
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = _data()

    def step(_: int) -> None:
        tokens = torch.randint(0, 20, (8, 12), generator=g)
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []
    assert watcher.param_names == ["embedding.weight", "mix.weight", "mix.bias"]


def test_alternating_heads() -> None:
    model = TwoHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        target = y if i % 2 == 0 else -y
        nn.functional.mse_loss(model(x, "a" if i % 2 == 0 else "b"), target).backward()
        opt.step()

    watcher = train(model, opt, steps=40, step_fn=step)
    assert watcher.findings == []


def test_alternating_heads_with_zeroed_not_freed_grads() -> None:
    model = TwoHead()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x, "a" if i % 2 == 0 else "b"), y).backward()
        opt.step()

    watcher = train(model, opt, steps=40, step_fn=step)
    assert watcher.findings == []


def test_converged_linear_model_keeps_training() -> None:
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = _data()

    def step(_: int) -> None:
        x = torch.randn(32, 1, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), 2 * x).backward()
        opt.step()

    watcher = train(model, opt, steps=300, step_fn=step)
    assert watcher.findings == []
    assert torch.allclose(model.weight, torch.tensor([[2.0]]), atol=1e-5)


def test_deep_residual_mlp_with_layernorm() -> None:
    model = ResidualMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watcher = train(model, opt, steps=30)
    assert watcher.findings == []


def test_lbfgs_with_closure() -> None:
    model = mlp(width=16)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=5)
    g = _data()
    x, y = regression_batch(generator=g)

    def step(_: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    watcher = train(model, opt, steps=10, step_fn=step)
    assert watcher.findings == []
    assert watcher.step == 10


def test_lbfgs_closure_zeroing_in_place() -> None:
    model = mlp(width=16)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=5)
    x, y = regression_batch(generator=_data())

    def step(_: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    watcher = train(model, opt, steps=10, step_fn=step)
    assert watcher.findings == []


def test_clip_grad_norm_before_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []


def test_gradient_exactly_zero_for_one_step_then_clipped() -> None:
    """An all-padding batch: the gradient is exactly zero everywhere, and clipping rescales it in
    place (its _version moves on), as zero_grad(set_to_none=False) after backward would; one
    such step in a row is not the bug."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad(set_to_none=False)
        weight = 0.0 if i in (5, 9) else 1.0  # the batch's mask: nothing counts
        (nn.functional.mse_loss(model(x), y) * weight).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    watcher = train(model, opt, steps=15, step_fn=step)
    assert watcher.findings == []


def test_gradient_exactly_zero_for_steps_in_a_row_not_reset() -> None:
    """A gradient that is legitimately zero at several steps running but untouched since it was
    accumulated (no clipping): not cleared."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad(set_to_none=False)
        weight = 0.0 if 5 <= i < 8 else 1.0
        (nn.functional.mse_loss(model(x), y) * weight).backward()
        opt.step()

    watcher = train(model, opt, steps=15, step_fn=step)
    assert watcher.findings == []


@pytest.mark.parametrize("how", ["zero_", "None"])
def test_one_parameter_cleared_on_purpose(how: str) -> None:
    """Clearing one parameter's gradient after backward (to hold it still) leaves the others."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    held = model[0].bias

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()
        assert held.grad is not None
        if how == "zero_":
            held.grad.zero_()
        else:
            held.grad = None
        opt.step()

    watcher = train(model, opt, steps=15, step_fn=step)
    assert watcher.findings == []


def test_grad_scaler_unscale_and_clip() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []
    assert watcher.step == 30


def test_grad_scaler_without_explicit_unscale() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []


def test_manual_unscale_in_place() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scale = 1024.0
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) * scale).backward()
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], 1 / scale)
        opt.step()

    watcher = train(model, opt, steps=30, step_fn=step)
    assert watcher.findings == []


def test_gan_generator_backward_reaches_discriminator() -> None:
    gan = GAN()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    g = _data()
    bce = nn.functional.binary_cross_entropy_with_logits
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record") as watcher:
        for _ in range(40):
            real = torch.randn(16, 2, generator=g) * 0.5 + 2.0
            noise = torch.randn(16, 4, generator=g)
            fake = gan.generator(noise)

            opt_d.zero_grad()
            d_real = gan.discriminator(real)
            d_fake = gan.discriminator(fake.detach())
            loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            loss_d.backward()
            opt_d.step()

            opt_g.zero_grad()
            d_fake = gan.discriminator(fake)
            bce(d_fake, torch.ones_like(d_fake)).backward()  # also fills the discriminator's grads
            opt_g.step()
    assert watcher.findings == []
    assert watcher.step == 40


def test_wgan_five_critic_steps_per_generator_step() -> None:
    """The generator gets gradients once per six backward passes: not disconnected."""
    gan = GAN()
    opt_g = torch.optim.RMSprop(gan.generator.parameters(), lr=5e-4)
    opt_d = torch.optim.RMSprop(gan.discriminator.parameters(), lr=5e-4)
    g = _data()
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record") as watcher:
        for _ in range(8):
            for _ in range(5):
                real = torch.randn(16, 2, generator=g) * 0.5 + 2.0
                fake = gan.generator(torch.randn(16, 4, generator=g)).detach()
                opt_d.zero_grad()
                (gan.discriminator(fake).mean() - gan.discriminator(real).mean()).backward()
                opt_d.step()
            opt_g.zero_grad()
            (-gan.discriminator(gan.generator(torch.randn(16, 4, generator=g))).mean()).backward()
            opt_g.step()
    assert watcher.findings == []


def test_optimizer_none_follows_the_optimizer() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    with gradwatch.watch(model, on_finding="record") as watcher:
        for _ in range(30):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert watcher.findings == []
    assert watcher.step == 30


def test_model_with_float64_and_float16_parameters() -> None:
    """Parameters of several dtypes in one model: one statistics group per dtype."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(out_features=4)
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
            self.offset = nn.Parameter(torch.zeros(4, dtype=torch.float16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.body(x) * self.scale.float() + self.offset.float()
            return out.sum(dim=1, keepdim=True)

    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = train(model, opt, steps=20)
    assert watcher.findings == []
    assert watcher.step == 20


def test_converged_deep_linear_network_is_not_vanishing() -> None:
    """Five stacked Linear layers fit a linear map exactly; every gradient then becomes tiny."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = _data()
    target_map = torch.randn(4, 4, generator=g) * 0.5
    x = torch.randn(64, 4, generator=g)
    losses: list[float] = []

    def step(_: int) -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x @ target_map)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    watcher = train(model, opt, steps=600, step_fn=step)
    assert losses[-1] < 1e-9  # converged: the gradients at the end are ~1e-6 or less
    assert watcher.findings == []


class _Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 8, sparse=True)
        self.fc = nn.Linear(8, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(tokens).mean(dim=1))


def test_sparse_embedding_with_sparse_adam() -> None:
    model = _Recommender()
    opt_sparse = torch.optim.SparseAdam(list(model.embedding.parameters()), lr=1e-2)
    opt_dense = torch.optim.Adam(model.fc.parameters(), lr=1e-2)
    g = _data()
    with gradwatch.watch(model, [opt_sparse, opt_dense], on_finding="record") as watcher:
        for _ in range(30):
            tokens = torch.randint(0, 100, (16, 4), generator=g)
            target = tokens.float().mean(dim=1, keepdim=True) / 100
            opt_sparse.zero_grad()
            opt_dense.zero_grad()
            nn.functional.mse_loss(model(tokens), target).backward()
            assert model.embedding.weight.grad is not None
            assert model.embedding.weight.grad.is_sparse
            opt_sparse.step()
            opt_dense.step()
    assert watcher.findings == []
    assert watcher.step == 30


# ---------------------------------------------------------------- no_update look-alikes
# The lr-0 and unchanged-weight loops that are not the bug (tests/test_updates.py has the bugs).
# Each opens an output (log_dir), so the weight norms are taken every 10 steps and judged.


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class _Regression:
    """One MSE regression step on synthetic data, as ``train``'s ``step_fn``; keeps the lr of
    the first group at each step in ``lrs``."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.model, self.opt, self.sched = model, opt, sched
        self.generator = _data()
        self.lrs: list[float] = []

    def __call__(self, _: int) -> None:
        x, y = regression_batch(generator=self.generator)
        self.opt.zero_grad()
        nn.functional.mse_loss(self.model(x), y).backward()
        self.lrs.append(float(self.opt.param_groups[0]["lr"]))
        self.opt.step()
        if self.sched is not None:
            self.sched.step()


def test_warmup_whose_first_step_has_lr_zero(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 10))
    step = _Regression(model, opt, sched)
    before = weights(model)
    watcher = train(
        model,
        opt,
        steps=25,
        step_fn=step,
        log_dir=tmp_path_factory.mktemp("warmup"),
    )
    assert step.lrs[0] == 0.0 and step.lrs[1] > 0.0  # step 0 (a weight-norm step) cannot move them
    assert not _same(before, weights(model))
    assert watcher.findings == []


def test_frozen_backbone_as_a_group_with_lr_zero(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The encoder's group has lr 0 on purpose, its gradients computed and never used, beside
    the decoder's group that trains: not every group holding gradients has lr 0, and the
    decoder's weights change."""
    model = EncoderDecoder()
    opt = torch.optim.SGD(
        [
            {"params": list(model.encoder.parameters()), "lr": 0.0},
            {"params": list(model.decoder.parameters()), "lr": 0.05},
        ]
    )
    encoder, decoder = weights(model.encoder), weights(model.decoder)
    watcher = train(
        model,
        opt,
        steps=25,
        step_fn=_Regression(model, opt),
        log_dir=tmp_path_factory.mktemp("backbone"),
    )
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert _same(encoder, weights(model.encoder))
    assert not _same(decoder, weights(model.decoder))
    assert watcher.findings == []


def test_frozen_parameters_given_to_the_optimizer(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``requires_grad_(False)`` on the first layer, and the optimizer built from all of
    ``model.parameters()``: the frozen ones have no gradient and are not judged."""
    model = mlp(depth=4)
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    frozen = weights(model[0])
    watcher = train(
        model,
        opt,
        steps=25,
        step_fn=_Regression(model, opt),
        log_dir=tmp_path_factory.mktemp("frozen"),
    )
    assert _same(frozen, weights(model[0]))
    assert watcher.findings == []


@pytest.mark.parametrize("where", ["loss", "one layer"])
def test_steps_skipped_for_nan_leave_the_weights_unchanged(
    tmp_path_factory: pytest.TempPathFactory, where: str
) -> None:
    """``on_nonfinite="skip"`` empties the steps 10 to 19: the weights at step 20 are bit for
    bit those at step 10, but no step was taken with gradients between. With NaN in one
    layer only, the step-10 gradients of the other layers are finite and above 0: only the
    count of steps taken with gradients tells this from the bug."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    nan_steps = range(10, 20) if where == "one layer" else range(9, 22)
    at: dict[int, list[torch.Tensor]] = {}

    def step(i: int) -> None:
        at[i] = weights(model)
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if i in nan_steps:
            if where == "loss":
                loss = loss * float("nan")
            else:  # a penalty on the last bias only that turns NaN
                loss = loss + model[4].bias.norm() * float("nan")
        loss.backward()
        opt.step()

    watcher = train(
        model,
        opt,
        steps=35,
        step_fn=step,
        log_dir=tmp_path_factory.mktemp("skip"),
        on_nonfinite="skip",
    )
    assert _same(at[10], at[20])
    assert not _same(at[20], at[30])
    assert {f.kind.value for f in watcher.findings} == {"nan", "skipped_step"}
    skipped = [f.step for f in watcher.findings if f.kind.value == "skipped_step"]
    assert skipped == [nan_steps[0]]  # reported once; each step of the run skipped
    assert watcher.occurrences[(gradwatch.Kind.SKIPPED_STEP, None)] == len(nan_steps)


def test_sparse_adam_leaves_rows_untouched(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SparseAdam updates only the rows a batch looked up; the others stay as they were, and
    the rows it did update change the embedding's norm."""
    model = _Recommender()
    opt_sparse = torch.optim.SparseAdam(list(model.embedding.parameters()), lr=1e-2)
    opt_dense = torch.optim.Adam(model.fc.parameters(), lr=1e-2)
    g = _data()
    seen: set[int] = set()
    before = model.embedding.weight.detach().clone()
    with gradwatch.watch(
        model,
        [opt_sparse, opt_dense],
        on_finding="record",
        log_dir=tmp_path_factory.mktemp("sparse"),
    ) as watcher:
        for _ in range(25):
            tokens = torch.randint(0, 50, (4, 3), generator=g)  # rows 50-99: never looked up
            seen.update(tokens.flatten().tolist())
            target = tokens.float().mean(dim=1, keepdim=True) / 100
            opt_sparse.zero_grad()
            opt_dense.zero_grad()
            nn.functional.mse_loss(model(tokens), target).backward()
            opt_sparse.step()
            opt_dense.step()
    after = model.embedding.weight.detach()
    untouched = sorted(set(range(100)) - seen)
    assert len(untouched) > 50
    assert torch.equal(before[untouched], after[untouched])
    assert not torch.equal(before, after)
    assert watcher.findings == []


def test_gradients_exactly_zero_everywhere_with_lr_zero(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Nothing to move: a loss multiplied by 0 (every sample masked out), and lr 0."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) * 0.0).backward()
        opt.step()

    before = weights(model)
    watcher = train(model, opt, steps=25, step_fn=step, log_dir=tmp_path_factory.mktemp("zero"))
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert _same(before, weights(model))
    assert watcher.findings == []


def test_cosine_schedule_reaching_lr_zero_at_the_last_step(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The last step of a cosine schedule to 0 has lr exactly 0, at a weight-norm step."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    step = _Regression(model, opt, sched)
    watcher = train(
        model,
        opt,
        steps=21,
        step_fn=step,
        log_dir=tmp_path_factory.mktemp("cosine"),
    )
    assert step.lrs[-1] == 0.0 and min(step.lrs[:-1]) > 0.0
    assert watcher.findings == []


def test_float32_training_with_log_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inner = _Regression(model, opt)
    moved: list[bool] = []

    def step(i: int) -> None:
        before = weights(model)
        inner(i)
        moved.append(
            not any(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        )

    watcher = train(model, opt, steps=40, step_fn=step, log_dir=tmp_path_factory.mktemp("f32"))
    assert all(moved)  # every parameter changes at every step
    assert watcher.findings == []


# ---------------------------------------------------------------- step_not_taken look-alikes
# Backward passes that no step follows at once, and that are not the bug (tests/test_steps.py
# has the bugs). Each runs with a small no_step_after, so the limit is tight; declared
# accumulation at a limit of one window is a row of test_declared_accumulation above.


def test_evaluation_under_no_grad_between_steps() -> None:
    """Twenty evaluation batches after every step: forward passes only, no backward pass."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    inner = _Regression(model, opt)
    evaluated = 0

    def step(i: int) -> None:
        nonlocal evaluated
        inner(i)
        model.eval()
        with torch.no_grad():
            for _ in range(20):
                x, y = regression_batch(generator=g)
                nn.functional.mse_loss(model(x), y)
                evaluated += 1
        model.train()

    watcher = train(model, opt, steps=5, step_fn=step, no_step_after=1)
    assert evaluated == 100
    assert watcher.findings == []
    assert watcher.step == 5


def test_input_gradients_between_steps() -> None:
    """Saliency maps between steps: ``torch.autograd.grad`` with respect to the inputs leaves
    the parameters' ``.grad`` alone, so none of these passes reaches a watched parameter."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    inner = _Regression(model, opt)

    def step(i: int) -> None:
        inner(i)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        for _ in range(5):
            x, _y = regression_batch(generator=g)
            x.requires_grad_(True)
            (saliency,) = torch.autograd.grad(model(x).sum(), x)
            assert saliency.shape == x.shape
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))

    watcher = train(model, opt, steps=5, step_fn=step, no_step_after=1)
    assert watcher.findings == []


def test_grad_scaler_skipping_the_first_steps_while_its_scale_backs_off() -> None:
    """float16 autocast with ``init_scale=2**40``: the scaled gradients overflow and the scaler
    skips the first 23 steps, halving its scale each time, then trains. 23 passes with no step
    after them stay below the default limit of 50."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    g = _data()
    stepped: list[bool] = []
    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        for _ in range(30):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
            before = watcher.step
            scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
            scaler.step(opt)
            scaler.update()
            stepped.append(watcher.step > before)
    assert stepped[:23] == [False] * 23 and all(stepped[23:28])
    assert scaler.get_scale() < 2.0**40 / 2**20
    assert watcher.step == stepped.count(True)
    assert watcher.findings == []


def test_wgan_five_critic_steps_per_generator_step_at_a_limit_of_three() -> None:
    """The critic steps after each of its passes. The generator's pass (which also fills the
    critic's gradients) is followed by the generator's step; the five critic passes between
    two generator steps do not reach the generator."""
    gan = GAN()
    opt_g = torch.optim.RMSprop(gan.generator.parameters(), lr=5e-4)
    opt_d = torch.optim.RMSprop(gan.discriminator.parameters(), lr=5e-4)
    g = _data()
    generator = weights(gan.generator)
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record", no_step_after=3) as watcher:
        for _ in range(6):
            for _ in range(5):
                real = torch.randn(16, 2, generator=g) * 0.5 + 2.0
                fake = gan.generator(torch.randn(16, 4, generator=g)).detach()
                opt_d.zero_grad()
                (gan.discriminator(fake).mean() - gan.discriminator(real).mean()).backward()
                opt_d.step()
            opt_g.zero_grad()
            (-gan.discriminator(gan.generator(torch.randn(16, 4, generator=g))).mean()).backward()
            assert all(p.grad is not None for p in gan.discriminator.parameters())
            opt_g.step()
    assert not _same(generator, weights(gan.generator))
    assert watcher.findings == []
    assert watcher.step == 30


def test_lbfgs_with_thirty_closure_evaluations_per_step() -> None:
    """Every backward pass runs inside ``optimizer.step()``: thirty per step, none counted."""
    model = mlp(width=16)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=0.5, max_iter=30, tolerance_grad=0.0, tolerance_change=0.0
    )
    x, y = regression_batch(generator=_data())
    evaluations: list[int] = []

    def step(_: int) -> None:
        evaluations.append(0)

        def closure() -> torch.Tensor:
            evaluations[-1] += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    watcher = train(model, opt, steps=3, step_fn=step, no_step_after=5)
    assert evaluations == [30, 30, 30]
    assert watcher.findings == []
    assert watcher.step == 3


def test_lightning_accumulate_grad_batches_at_a_limit_of_one_window(
    tmp_path: pathlib.Path,
) -> None:
    """``accumulate_grad_batches=4``: the callback reads it, so the limit is ``1 * 4``; three
    passes of each window run outside ``optimizer.step()``, the fourth in its closure."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class Regressor(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = EncoderDecoder()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def accumulating(callback: Any) -> Any:
        return fit(
            pl, Regressor(), [callback], tmp_path, steps=4, data=loader(batches=16),
            accumulate_grad_batches=4,
        )  # fmt: skip

    callback = GradWatchCallback(on_finding="record", log_dir=False, no_step_after=1)
    trainer = accumulating(callback)
    assert callback.accumulation_steps is None  # read from the Trainer
    assert trainer.global_step == callback.step == 4
    assert callback.findings == []
    # The same run declaring one pass per step: the limit is 1, and the third pass is reported,
    # with the two before it that no step followed.
    strict = GradWatchCallback(
        on_finding="record", log_dir=False, no_step_after=1, accumulation_steps=1
    )
    accumulating(strict)
    assert [(f.kind, f.cause, f.step, f.value, f.threshold) for f in strict.findings] == [
        (gradwatch.Kind.STEP_NOT_TAKEN, "no_step", 0, 2.0, 1.0),
        (gradwatch.Kind.UNEXPECTED_ACCUMULATION, None, 0, 4.0, 1.0),
    ]


def test_resumed_run_steps_on() -> None:
    """A state saved after ten healthy steps and loaded into a new watcher: the next steps are
    as healthy as the first ten."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = _Regression(model, opt)
    first = train(model, opt, steps=10, step_fn=step, no_step_after=1)
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=1) as resumed:
        resumed.load_state_dict(first.state_dict())
        for i in range(10):
            step(i)
    assert resumed.step == 20
    assert resumed.findings == []


# ---------------------------------------------------------------- clip_order look-alikes
# Clipping done right in the places loops put it. Lightning's gradient_clip_val and the
# transformers Trainer's max_grad_norm run in tests/test_lightning.py and
# tests/test_transformers.py.


def _clipped_regression(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    clip: Callable[[], object],
    *,
    micro_batches: int = 1,
) -> Callable[[int], None]:
    g = _data()

    def step(_: int) -> None:
        opt.zero_grad()
        for _ in range(micro_batches):
            x, y = regression_batch(generator=g)
            (nn.functional.mse_loss(model(x), y) / micro_batches).backward()
            clip()
        opt.step()

    return step


def test_clip_grad_norm_with_foreach_before_step() -> None:
    model = cnn_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _data()

    def step(_: int) -> None:
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.1, foreach=True)
        opt.step()

    watcher = train(model, opt, steps=10, step_fn=step)
    assert watcher.findings == []


def test_clipping_only_the_head() -> None:
    model = EncoderDecoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = _clipped_regression(
        model, opt, lambda: torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 0.1)
    )
    watcher = train(model, opt, steps=10, step_fn=step)
    assert watcher.findings == []


def test_clip_after_every_micro_batch_of_declared_accumulation() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = _clipped_regression(
        model, opt, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5), micro_batches=4
    )
    watcher = train(model, opt, steps=8, step_fn=step, accumulation_steps=4)
    assert watcher.findings == []


def test_clipping_through_the_clip_grad_module() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clip_grad = torch.nn.utils.clip_grad
    step = _clipped_regression(
        model, opt, lambda: clip_grad.clip_grad_value_(model.parameters(), 0.05)
    )
    watcher = train(model, opt, steps=8, step_fn=step)
    assert watcher.findings == []


def test_alternating_heads_clipping_every_parameter() -> None:
    """The idle head's gradient is the one an earlier step used (zero_grad(set_to_none=False)
    keeps its tensor): the reached trunk makes the call well placed."""
    model = TwoHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x, "a" if i % 2 == 0 else "b"), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()

    watcher = train(model, opt, steps=12, step_fn=step)
    assert watcher.findings == []


def test_lbfgs_clipping_inside_the_closure() -> None:
    model = mlp(width=8)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            return loss

        opt.step(closure)

    watcher = train(model, opt, steps=6, step_fn=step)
    assert watcher.findings == []


def test_gan_clipping_each_network_before_its_step() -> None:
    """The generator's backward also fills the discriminator's gradients; each network is
    clipped after its own backward; then the same with one clip over the whole GAN."""
    for whole in (False, True):
        gan = GAN()
        opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        g = _data()
        bce = nn.functional.binary_cross_entropy_with_logits
        clip = torch.nn.utils.clip_grad_norm_
        with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record") as watcher:
            for _ in range(10):
                real = torch.randn(16, 2, generator=g) * 0.5 + 2.0
                fake = gan.generator(torch.randn(16, 4, generator=g))
                opt_d.zero_grad()
                d_real, d_fake = gan.discriminator(real), gan.discriminator(fake.detach())
                (
                    bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
                ).backward()
                clip(gan.parameters() if whole else gan.discriminator.parameters(), 1.0)
                opt_d.step()
                opt_g.zero_grad()
                d_fake = gan.discriminator(fake)
                bce(d_fake, torch.ones_like(d_fake)).backward()
                clip(gan.parameters() if whole else gan.generator.parameters(), 1.0)
                opt_g.step()
        assert watcher.findings == []
        assert watcher.step == 10


def test_grad_scaler_overflow_steps_with_unscale_and_clip() -> None:
    """Dynamic loss scaling skips the steps whose scaled gradients overflow; the clip of a
    skipped step is not carried into the next one."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    g = _data()
    scales: list[float] = []

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if i in (2, 3):
            loss = loss * 1e35  # scaled by 2**16, the gradients overflow float32
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())

    watcher = train(model, opt, steps=8, step_fn=step)
    assert scales[2] == 2.0**15 and scales[3] == 2.0**14  # both steps were skipped
    assert watcher.findings == []


# ---------------------------------------------------------------- exploding: a converged run


def test_round_off_at_the_bottom_of_a_converged_run_is_not_exploding() -> None:
    """Trained, then converged: the gradients are round-off, norms about 1e-12 of their early
    scale, and one step's round-off is a thousand times the others' (about 1e-8 of the scale).
    Still a millionth of where the run started: noise, not an explosion."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = _data()
    norms: list[float] = []

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        size = 1.0 if i < 40 else 1e-8 if i in (70, 90) else 1e-12
        (nn.functional.mse_loss(model(x), y) * size).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()

    watcher = train(model, opt, steps=100, step_fn=step)
    assert norms[70] > 1000 * sorted(norms[40:70])[15]  # past explode_factor x the recent median
    assert watcher.findings == []


# ---------------------------------------------------------------- no_grad: nothing trains them


class _QLearner(nn.Module):
    """A Q-network and its target network as submodules, the target's ``requires_grad`` left
    on: in no optimizer, never given a gradient, synced by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.q = mlp(width=16, out_features=2)
        self.target = mlp(width=16, out_features=2)
        self.target.load_state_dict(self.q.state_dict())


def test_dqn_target_network_left_requiring_grad() -> None:
    agent = _QLearner()
    opt = torch.optim.Adam(agent.q.parameters(), lr=1e-3)
    g = _data()
    with gradwatch.watch(agent, opt, on_finding="record") as watcher:
        for i in range(20):
            state, following = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
            reward = torch.randn(32, generator=g)
            with torch.no_grad():
                target = reward + 0.99 * agent.target(following).max(dim=1).values
            q = agent.q(state).gather(1, torch.zeros(32, 1, dtype=torch.long)).squeeze(1)
            opt.zero_grad()
            nn.functional.smooth_l1_loss(q, target).backward()
            opt.step()
            if i % 5 == 4:
                agent.target.load_state_dict(agent.q.state_dict())
    assert all(p.requires_grad and p.grad is None for p in agent.target.parameters())
    assert watcher.findings == []


def test_ema_copy_kept_as_a_submodule() -> None:
    class WithEMA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.ema = mlp()
            self.ema.load_state_dict(self.net.state_dict())

    model = WithEMA()
    opt = torch.optim.SGD(model.net.parameters(), lr=0.05, momentum=0.9)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model.net(x), y).backward()
        opt.step()
        with torch.no_grad():
            ema, net = list(model.ema.parameters()), list(model.net.parameters())
            torch._foreach_lerp_(ema, net, 0.01)

    watcher = train(model, opt, steps=20, step_fn=step)
    assert watcher.findings == []


def test_lightning_dqn_target_network(tmp_path: pathlib.Path) -> None:
    """As Lightning's reinforcement-learning example keeps it: ``self.target_net`` beside
    ``self.net``, one optimizer over ``self.net``."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class DQN(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width=16, out_features=2)
            self.target_net = mlp(width=16, out_features=2)
            self.target_net.load_state_dict(self.net.state_dict())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            state, reward = batch
            with torch.no_grad():
                target = reward.squeeze(1) + 0.99 * self.target_net(state).max(dim=1).values
            q = self.net(state).max(dim=1).values
            if batch_idx % 4 == 3:
                self.target_net.load_state_dict(self.net.state_dict())
            return nn.functional.mse_loss(q, target)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.net.parameters(), lr=1e-3)

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(16 * 12, 8, generator=generator), torch.randn(16 * 12, 1, generator=generator)
    )
    callback = GradWatchCallback(on_finding="record", log_dir=False)
    fit(pl, DQN(), [callback], tmp_path, data=torch.utils.data.DataLoader(data, batch_size=16))
    assert callback.findings == []
    assert callback.step == 12


# ---------------------------------------------------------------- backward(create_graph=True)


@pytest.mark.parametrize("on_nonfinite", ["report", "skip"])
def test_backward_with_create_graph(tmp_path: pathlib.Path, on_nonfinite: str) -> None:
    """Second-order training keeps the gradients in a graph (they require grad): they are
    checked, histogrammed and skipped on like any others."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward(create_graph=True)
        assert all(p.grad is not None and p.grad.requires_grad for p in model.parameters())
        opt.step()  # checked with the gradients still in their graph

    options: dict[str, Any] = {"log_dir": tmp_path, "histogram_every": 1}
    watcher = train(model, opt, steps=6, step_fn=step, on_nonfinite=on_nonfinite, **options)
    assert watcher.findings == []
    assert watcher.step == 6
