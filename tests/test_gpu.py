"""On CUDA, a watched step that reports nothing never waits for the device.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call (a blocking
device-to-host copy, ``.item()``, ``nonzero()``...) into an error, so a quiet step that ran under
it made no host-device synchronisation. Steps where a finding or a histogram is due are run under
``"warn"`` instead and may synchronise at most once.
"""

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch

pytestmark = pytest.mark.gpu


@contextmanager
def _sync_debug(mode: str) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    device = torch.device("cuda")
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.LayerNorm(64),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    ).to(device)
    # foreach SGD keeps the user's own step free of synchronisation.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(16, 32, device=device)
    y = torch.randn(16, 4, device=device)
    return model, optimizer, x, y


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    poison: bool = False,
) -> None:
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if poison:
        first = next(model.parameters())
        assert first.grad is not None
        first.grad.view(-1)[0] = float("nan")
    optimizer.step()


def _synchronisations(run: Callable[[], None]) -> int:
    with warnings.catch_warnings(record=True) as caught, _sync_debug("warn"):
        warnings.simplefilter("always")
        run()
    return sum("synchronizing" in str(w.message).lower() for w in caught)


def test_quiet_steps_never_synchronise(tmp_path: Path) -> None:
    model, optimizer, x, y = _setup()
    # Histograms off: every step after the first is quiet.
    watcher = gradwatch.watch(
        model, optimizer, log_dir=tmp_path, histogram_every=0, on_finding="record"
    )
    try:
        for _ in range(3):  # plans and the first history are built here
            _step(model, optimizer, x, y)
        torch.cuda.synchronize()
        with _sync_debug("error"):
            for _ in range(30):
                _step(model, optimizer, x, y)
    finally:
        watcher.close()
    assert watcher.findings == []
    assert watcher.step == 33


def test_quiet_steps_without_log_dir_never_synchronise() -> None:
    model, optimizer, x, y = _setup()
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        for _ in range(3):
            _step(model, optimizer, x, y)
        torch.cuda.synchronize()
        with _sync_debug("error"):
            for _ in range(30):
                _step(model, optimizer, x, y)
    assert watcher.findings == []


def test_a_due_histogram_or_finding_copies_at_most_once(tmp_path: Path) -> None:
    model, optimizer, x, y = _setup()
    with gradwatch.watch(
        model, optimizer, log_dir=tmp_path, histogram_every=5, on_finding="record"
    ) as watcher:
        for _ in range(6):
            _step(model, optimizer, x, y)
        torch.cuda.synchronize()
        for step in range(6, 16):
            # Step 10 takes a histogram; steps 11 and 12 may report it (it lands a step later).
            assert _synchronisations(lambda: _step(model, optimizer, x, y)) <= 1, step
        assert _synchronisations(lambda: _step(model, optimizer, x, y, poison=True)) <= 1
        for _ in range(2):
            assert _synchronisations(lambda: _step(model, optimizer, x, y)) <= 1
    assert [f.kind for f in watcher.findings][:1] == [gradwatch.Kind.NAN]


def _lightning_fit(precision: str, nan: bool, steps: int) -> tuple[object, int]:
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class Regressor(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.model(x).float(), y)
            if nan:
                loss = loss * torch.log(torch.zeros((), device=loss.device))  # -inf * 0: NaN
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    callback = GradWatchCallback(on_finding="record", log_dir=False)
    trainer = pl.Trainer(
        callbacks=[callback],
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=16))
    return callback, trainer.global_step


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_mixed_precision_on_cuda_is_silent_when_healthy(precision: str) -> None:
    callback, _ = _lightning_fit(precision, nan=False, steps=30)
    assert callback.findings == []  # type: ignore[attr-defined]
    assert callback.step > 0  # type: ignore[attr-defined]


def test_lightning_16_mixed_on_cuda_reports_a_nan_loss_once() -> None:
    callback, _ = _lightning_fit("16-mixed", nan=True, steps=24)
    # GradScaler skips every step; gradwatch tolerates that while the scale backs off, then
    # reports the NaN once the scale can no longer explain it.
    assert [f.kind for f in callback.findings] == [gradwatch.Kind.NAN]  # type: ignore[attr-defined]
    assert callback.step == 0  # type: ignore[attr-defined]


def test_skip_on_cuda_reports_and_skips_at_the_step_itself() -> None:
    # on_nonfinite="skip" needs the answer before the optimizer runs: the check waits for its
    # statistics (a synchronisation) instead of reading them a step later.
    model, optimizer, x, y = _setup()
    with gradwatch.watch(model, optimizer, on_finding="record", on_nonfinite="skip") as watcher:
        for _ in range(3):
            _step(model, optimizer, x, y)
        torch.cuda.synchronize()
        for step in range(3, 8):
            assert _synchronisations(lambda: _step(model, optimizer, x, y)) <= 1, step
        before = [p.detach().clone() for p in model.parameters()]
        _step(model, optimizer, x, y, poison=True)
        # Reported during step 8 itself, and nothing moved.
        assert [(f.kind, f.step) for f in watcher.findings] == [
            (gradwatch.Kind.NAN, 8),
            (gradwatch.Kind.SKIPPED_STEP, 8),
        ]
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        _step(model, optimizer, x, y)
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert len(watcher.findings) == 2
