"""One behaviour table, three front ends: ``gradwatch.watch()`` in a plain PyTorch loop,
``gradwatch.lightning.GradWatchCallback`` in ``lightning.pytorch.Trainer.fit`` and
``gradwatch.transformers.GradWatchCallback`` in ``transformers.Trainer.train`` train the same
network on the same batches with the same planted bugs, and must report the same findings
(kind, step, parameter) at the same steps.

How the three runs are made the same run:

- Parameter names. Each front end watches a module that holds the one shared network,
  ``EncoderDecoder`` from ``tests.helpers.models`` built from the same seed, under the attribute
  ``net``: the plain loop and the ``transformers.Trainer`` watch :class:`Task` (the network plus
  its loss, since the Trainer wants ``forward(**batch)`` to return the loss), Lightning watches
  :class:`LightningTask` (a ``LightningModule`` with the network as ``self.net``). Every
  parameter is therefore called ``net.<name>`` by all three, and names are compared exactly as
  reported, with no prefix stripped.
- Data. One fixed tensor dataset per case, exactly ``steps * accumulation`` batches long, read
  in order: slices in the plain loop, an unshuffled ``DataLoader`` in Lightning, and in the
  Trainer a ``SequentialSampler`` (``_get_train_sampler`` overridden; the Trainer's default is a
  ``RandomSampler``) with ``dataloader_drop_last``.
- Optimization. Plain SGD at one learning rate, built by the test for the plain loop and the
  Trainer (``optimizers=(sgd, None)`` with ``lr_scheduler_type="constant"``) and by
  ``configure_optimizers`` in Lightning. Nothing clips: ``max_grad_norm=0`` for the Trainer (it
  clips to 1.0 by default), no ``gradient_clip_val`` in Lightning. Each micro-batch's loss is
  divided by the accumulation count, as both frameworks do, and the plain loop does too.
- Steps. Findings carry the optimizer step, counted from 0 by all three (the loop's index,
  ``trainer.global_step``, ``state.global_step``), and bugs are planted by that same count
  (``LightningModule.global_step``, ``TrainerState.global_step``), which stays the same over the
  micro-batches of one step. A loss multiplied at step k plants the explosion rather than a
  learning rate raised at step k, because the Trainer's scheduler writes its own learning rate
  back into the optimizer after every step.

The final weights of the three runs are compared as well: equal weights show that the three
front ends watched the same training, so a difference in findings is gradwatch's, not the
harness's.

Not in the table: a forgotten ``optimizer.zero_grad()``. Lightning's automatic optimization and
the Trainer zero the gradients themselves, so that bug cannot be planted there (Lightning's
manual optimization, where it can, is covered in ``tests/test_lightning.py``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.sinks import Sink
from tests.helpers.models import EncoderDecoder

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")
LightningCallback = pytest.importorskip("gradwatch.lightning").GradWatchCallback
TransformersCallback = pytest.importorskip("gradwatch.transformers").GradWatchCallback

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")

SEED = 0
BATCH = 8
FEATURES = 8
LR = 0.05
LOSS_SCALE = 1e6
"""The planted explosion: far beyond ``explode_factor`` (1000) times the recent median."""

FRONT_ENDS = ("watch", "lightning", "transformers")

Triple = tuple[str, int, str | None]
Weights = dict[str, torch.Tensor]


def _all_changed(before: Weights, after: Weights) -> None:
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def _not_finite(before: Weights, after: Weights) -> None:
    assert not all(torch.isfinite(w).all() for w in after.values())


def _bias_not_finite(before: Weights, after: Weights) -> None:
    assert not torch.isfinite(after["decoder.2.bias"]).all()


def _blown_up(before: Weights, after: Weights) -> None:
    largest = max(float((after[n] - before[n]).abs().max()) for n in before)
    assert largest > 1e3  # the initial weights are below 1 in magnitude


def _encoder_untrained(before: Weights, after: Weights) -> None:
    encoder = [n for n in before if n.startswith("encoder.")]
    assert encoder
    assert all(torch.equal(before[n], after[n]) for n in encoder)
    assert not any(torch.equal(before[n], after[n]) for n in before if n not in encoder)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table.

    Attributes:
        accumulation: Backward passes per optimizer step, in every front end's loop.
        declared: ``accumulation_steps`` given to gradwatch; ``None``: ``watch()`` gets
            ``accumulation`` (what a user of the plain loop declares) and the callbacks read the
            framework's own setting.
        bites: Asserts, from the weights before and after, that the planted bug did its harm.
    """

    name: str
    expected: tuple[Triple, ...]
    steps: int = 6
    accumulation: int = 1
    declared: int | None = None
    detach: bool = False
    nan_at: int | None = None
    inf_at: int | None = None
    scale_at: int | None = None
    bites: Callable[[Weights, Weights], None] | None = None


CASES = [
    Case("healthy", (), bites=_all_changed),
    # The loss is NaN, so every gradient is; the one that arrives first, nearest the loss, leads.
    Case("nan_loss", (("nan", 3, "net.decoder.2.bias"),), steps=5, nan_at=3, bites=_not_finite),
    # Only the output bias gets an Inf gradient. The Trainer measures the gradient norm before
    # every step, also when it does not clip, with accelerate's clip_grad_norm_(max_norm=inf),
    # which leaves the gradients alone (accelerate 1.16 with torch.distributed available). Its
    # fallback without torch.distributed, torch.nn.utils.clip_grad_norm_(max_norm=inf),
    # multiplies every gradient by inf / inf = NaN: there this row would read `nan`, on every
    # parameter, for the Trainer.
    Case(
        "inf_gradient",
        (("inf", 3, "net.decoder.2.bias"),),
        steps=4,
        inf_at=3,
        bites=_bias_not_finite,
    ),
    # After warmup_steps (5) checks of history, the loss scaled a millionfold at step 5; the
    # output bias, with the largest gradient, leads those that grew most.
    Case("exploding", (("exploding", 5, "net.decoder.2.bias"),), scale_at=5, bites=_blown_up),
    # The encoder's output is detached: no gradient reaches it in no_grad_after (5) passes.
    Case(
        "detached_encoder",
        (("no_grad", 4, "net.encoder.0.weight"),),
        detach=True,
        bites=_encoder_untrained,
    ),
    Case("declared_accumulation", (), steps=3, accumulation=2, bites=_all_changed),
    # The loops accumulate two passes while gradwatch is told one: found at the first step.
    Case(
        "undeclared_accumulation",
        (("unexpected_accumulation", 0, "net.decoder.2.bias"),),
        steps=3,
        accumulation=2,
        declared=1,
    ),
]


def plant(case: Case, loss: torch.Tensor, step: int, net: nn.Module) -> torch.Tensor:
    """``loss`` of optimizer step ``step`` with the case's bug planted in it."""
    if step == case.nan_at:
        loss = loss * torch.tensor(float("nan"))
    if step == case.scale_at:
        loss = loss * LOSS_SCALE
    if step == case.inf_at:
        bias = net.decoder[2].bias  # type: ignore[index]
        loss = loss + bias.sum() * math.inf  # d/d(bias) = +Inf, every other gradient finite
    return loss


# ---------------------------------------------------------------------- the shared run


def shared_net(case: Case) -> EncoderDecoder:
    torch.manual_seed(SEED)
    return EncoderDecoder(FEATURES, detach=case.detach)


def dataset(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(case.steps * case.accumulation * BATCH, FEATURES, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def weights(net: nn.Module) -> Weights:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


class Task(nn.Module):
    """The shared network as ``net`` and its loss, as ``transformers.Trainer`` calls a model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


class Recorder(Sink):
    """A sink of the user's own, passed with ``sinks=``: what each front end sends it."""

    def __init__(self) -> None:
        self.checked: list[int] = []
        self.findings: list[tuple[gradwatch.Finding, int | None]] = []
        self.closed = 0

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        assert len(names) == len(norms)
        self.checked.append(step)

    def write_finding(self, finding: gradwatch.Finding, *, rank: int | None = None) -> None:
        self.findings.append((finding, rank))

    def close(self) -> None:
        self.closed += 1


@dataclasses.dataclass(frozen=True)
class Run:
    findings: list[gradwatch.Finding]
    steps: int
    before: Weights
    after: Weights
    sink: Recorder


def run_watch(case: Case, tmp_path: pathlib.Path) -> Run:
    task = Task(shared_net(case))
    before = weights(task.net)
    x, y = dataset(case)
    optimizer = torch.optim.SGD(task.parameters(), lr=LR)
    passes = case.accumulation
    sink = Recorder()
    with gradwatch.watch(
        task,
        optimizer,
        log_dir=None,  # watch()'s "no files" (False is the callbacks' spelling)
        accumulation_steps=case.declared or passes,
        on_finding="record",
        sinks=[sink],
    ) as watcher:
        for step in range(case.steps):
            optimizer.zero_grad()
            for micro in range(passes):
                start = (step * passes + micro) * BATCH
                batch = slice(start, start + BATCH)
                loss = plant(case, task(x[batch], y[batch])["loss"], step, task.net)
                (loss / passes).backward()
            optimizer.step()
    return Run(watcher.findings, watcher.step, before, weights(task.net), sink)


class LightningTask(pl.LightningModule):  # type: ignore[misc]
    """The shared network as ``self.net``, trained by automatic optimization."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.net = shared_net(case)
        self.case = case

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return plant(self.case, loss, self.global_step, self.net)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def run_lightning(case: Case, tmp_path: pathlib.Path) -> Run:
    module = LightningTask(case)
    before = weights(module.net)
    sink = Recorder()
    callback = LightningCallback(
        on_finding="record", log_dir=False, accumulation_steps=case.declared, sinks=[sink]
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*dataset(case)), batch_size=BATCH, shuffle=False
    )
    trainer = pl.Trainer(
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        max_steps=case.steps,
        accumulate_grad_batches=case.accumulation,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)
    assert trainer.global_step == case.steps
    return Run(callback.findings, callback.step, before, weights(module.net), sink)


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class PlantingTrainer(transformers.Trainer):  # type: ignore[misc]
    """A ``Trainer`` reading its data in order, with the case's bug planted in the loss."""

    def __init__(self, *args: Any, case: Case, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.case = case

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler[int]:
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return plant(self.case, loss, self.state.global_step, self.model.net)


def run_transformers(case: Case, tmp_path: pathlib.Path) -> Run:
    task = Task(shared_net(case))
    before = weights(task.net)
    sink = Recorder()
    callback = TransformersCallback(
        on_finding="record", log_dir=False, accumulation_steps=case.declared, sinks=[sink]
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=case.steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=case.accumulation,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        seed=SEED,
    )
    trainer = PlantingTrainer(
        model=task,
        args=args,
        train_dataset=Rows(*dataset(case)),
        callbacks=[callback],
        optimizers=(torch.optim.SGD(task.parameters(), lr=LR), None),
        case=case,
    )
    trainer.train()
    assert trainer.state.global_step == case.steps
    return Run(callback.findings, callback.step, before, weights(task.net), sink)


RUNNERS: dict[str, Callable[[Case, pathlib.Path], Run]] = {
    "watch": run_watch,
    "lightning": run_lightning,
    "transformers": run_transformers,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Case, str], Run]]:
    """Each (case, front end) trained once, on one thread, shared by the tests below."""
    done: dict[tuple[str, str], Run] = {}

    def run(case: Case, front_end: str) -> Run:
        key = (case.name, front_end)
        if key not in done:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # models this small train faster on one thread
            try:
                directory = tmp_path_factory.mktemp(f"{case.name}-{front_end}")
                done[key] = RUNNERS[front_end](case, directory)
            finally:
                torch.set_num_threads(threads)
        return done[key]

    yield run


def triples(findings: list[gradwatch.Finding]) -> list[Triple]:
    return [(f.kind.value, f.step, f.param) for f in findings]


def described(
    findings: list[gradwatch.Finding],
) -> list[tuple[str, int, str | None, tuple[str, ...]]]:
    """Kind, step, parameter and every parameter involved, in order."""
    return [(f.kind.value, f.step, f.param, f.params) for f in findings]


CASE_IDS = [case.name for case in CASES]


# ---------------------------------------------------------------------- the tests


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_table(case: Case, front_end: str, runs: Callable[[Case, str], Run]) -> None:
    run = runs(case, front_end)
    assert triples(run.findings) == list(case.expected)
    assert run.steps == case.steps
    if case.bites is not None:
        case.bites(run.before, run.after)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_front_ends_agree(case: Case, runs: Callable[[Case, str], Run]) -> None:
    """Every front end against ``watch()``: findings with every parameter involved, and the
    weights they trained."""
    found = {front_end: described(runs(case, front_end).findings) for front_end in FRONT_ENDS}
    reference = runs(case, "watch")
    for front_end in FRONT_ENDS[1:]:
        assert found[front_end] == found["watch"], f"{front_end} differs: {found}"
        run = runs(case, front_end)
        for name, initial in reference.before.items():
            torch.testing.assert_close(run.before[name], initial, rtol=0, atol=0)
            torch.testing.assert_close(
                run.after[name],
                reference.after[name],
                equal_nan=True,
                msg=lambda message, name=name, front_end=front_end: (
                    f"{front_end} trained net.{name} differently from watch(): {message}"
                ),
            )


@pytest.mark.parametrize("front_end", list(RUNNERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sinks_of_the_users_own(
    case: Case, front_end: str, runs: Callable[[Case, str], Run]
) -> None:
    """``sinks=`` in every front end: a statistics call per optimizer step, each finding once as
    it is reported (with ``rank`` 0 from the callbacks, ``None`` from ``watch()``), closed once
    at the end."""
    run = runs(case, front_end)
    assert run.sink.checked == list(range(case.steps))
    assert [finding for finding, _ in run.sink.findings] == run.findings
    rank = None if front_end == "watch" else 0
    assert {r for _, r in run.sink.findings} <= {rank}
    assert run.sink.closed == 1
