"""GradWatchCallback inside real ``transformers.Trainer.train`` runs on CPU: tiny BERT and GPT-2
models built from configs, random tokens, a few steps each; DDP with two gloo processes."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradwatch import GradientError, GradWatchWarning, Kind
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME
from gradwatch.transformers import GradWatchCallback
from tests.helpers.clipping import clip_spy
from tests.helpers.transformers_models import (
    BertWithAuxHead,
    NanLossTrainer,
    RandomTokens,
    tiny_bert,
    tiny_gpt2,
    training_args,
)

HELPERS = pathlib.Path(__file__).resolve().parent / "helpers"
ENTRY = r"gradwatch\.transformers\.GradWatchCallback\(\):? "


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Models this small train several times faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_tensorboard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


def train(
    tmp_path: pathlib.Path,
    callback: GradWatchCallback,
    model: nn.Module | None = None,
    *,
    trainer: type[Any] = transformers.Trainer,
    task: str = "classification",
    trainer_options: dict[str, Any] | None = None,
    extra_callbacks: Sequence[Any] = (),
    **arguments: Any,
) -> Any:
    """``Trainer.train`` of ``model`` (default: the tiny BERT) with ``callback``; the trainer."""
    run = trainer(
        model=model if model is not None else tiny_bert(),
        args=training_args(tmp_path / "out", **arguments),
        train_dataset=RandomTokens(task=task),
        callbacks=[callback, *extra_callbacks],
        **(trainer_options or {}),
    )
    run.train()
    return run


def record(**options: Any) -> GradWatchCallback:
    return GradWatchCallback(on_finding="record", log_dir=False, **options)


def triples(callback: GradWatchCallback) -> list[tuple[str, int, str | None]]:
    return [(f.kind.value, f.step, f.param) for f in callback.findings]


def hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Every kind of hook gradwatch could have left on the model or the torch optimizer."""
    return {
        "forward": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "post_accumulate_grad": sum(
            len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()
        ),
        "tensor": sum(len(p._backward_hooks or {}) for p in model.parameters()),
        "step": len(optimizer._optimizer_step_pre_hooks)
        + len(optimizer._optimizer_step_post_hooks),
    }


NO_HOOKS = {"forward": 0, "post_accumulate_grad": 0, "tensor": 0, "step": 0}


class HookSpy(transformers.TrainerCallback):
    """The hooks on the model and the torch optimizer at the end of the first step."""

    def __init__(self) -> None:
        self.during: dict[str, int] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.during:
            self.during = hooks_left(kwargs["model"], kwargs["optimizer"].optimizer)


def read_log(directory: str | pathlib.Path) -> list[tuple[str, int, int]]:
    lines = (pathlib.Path(directory) / FINDINGS_LOG_NAME).read_text().splitlines()
    return [(r["kind"], r["step"], r["rank"]) for r in map(json.loads, lines)]


def scalar_tags(directory: str | pathlib.Path) -> list[str]:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return list(accumulator.Tags()["scalars"])


# ---------------------------------------------------------------------- healthy runs: silent


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_healthy_run_is_silent_and_shares_the_tensorboard_run(
    name: str, tmp_path: pathlib.Path
) -> None:
    model = tiny_bert() if name == "bert" else tiny_gpt2()
    callback = GradWatchCallback(on_finding="raise")
    spy = HookSpy()
    trainer = train(
        tmp_path, callback, model, task="lm" if name == "gpt2" else "classification",
        report_to=["tensorboard"], extra_callbacks=[spy],
    )  # fmt: skip
    assert callback.findings == []
    assert callback.step == trainer.state.global_step == 6
    assert "no gradient problems found in 6 optimizer steps" in callback.summary()
    # The TensorBoardCallback's run: <output_dir>/runs/<date>_<host>, with the Trainer's metrics.
    run = pathlib.Path(callback.output_dir or "")
    assert run.parent == tmp_path / "out" / "runs"
    assert {"gradwatch/grad_norm/total", "train/train_loss"} <= set(scalar_tags(run))
    assert (run / FINDINGS_LOG_NAME).read_text() == ""
    trainable = sum(p.requires_grad for p in model.parameters())
    # one step pre-hook (passes inside a step are not overdue) and one post-hook; the forward
    # probe's pre- and post-hook on the model, until it has seen its second forward pass
    assert spy.during == {**NO_HOOKS, "post_accumulate_grad": trainable, "step": 2, "forward": 2}
    assert hooks_left(model, trainer.optimizer.optimizer) == NO_HOOKS


# ---------------------------------------------------------------------- bugs: reported


def test_nan_loss_is_reported_at_its_step(tmp_path: pathlib.Path) -> None:
    callback = GradWatchCallback(on_finding="record")
    train(tmp_path, callback, trainer=NanLossTrainer, trainer_options={"nan_at": 3})
    assert triples(callback) == [("nan", 3, "classifier.bias")]  # nearest to the loss first
    # Without the Trainer's own TensorBoard, into <output_dir>/gradwatch_logs.
    assert callback.output_dir == str(tmp_path / "out" / "gradwatch_logs")
    assert read_log(callback.output_dir) == [("nan", 3, 0)]
    assert "gradwatch/findings/nan" in scalar_tags(callback.output_dir)


def test_skip_keeps_the_nan_step_out_of_the_weights(tmp_path: pathlib.Path) -> None:
    callback = record(on_nonfinite="skip")
    trainer = train(tmp_path, callback, trainer=NanLossTrainer, trainer_options={"nan_at": 3})
    assert triples(callback) == [("nan", 3, "classifier.bias"), ("skipped_step", 3, None)]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_detached_head_gets_no_gradient(tmp_path: pathlib.Path) -> None:
    model = BertWithAuxHead()
    head = [p.detach().clone() for p in model.aux_head.parameters()]
    with pytest.warns(GradWatchWarning, match=r"\[no_grad\] step 4: .*aux_head\.weight"):
        train(tmp_path, GradWatchCallback(log_dir=False), model)
    # The bug bites: the head never trained, while the rest of the model did.
    assert all(torch.equal(p, w) for p, w in zip(model.aux_head.parameters(), head, strict=True))


def test_accumulation_is_read_from_the_arguments(tmp_path: pathlib.Path) -> None:
    callback = record()
    with clip_spy() as spy:
        train(tmp_path, callback, gradient_accumulation_steps=2, max_steps=3)
    assert callback.findings == []
    assert spy.clips == [1.0] * 3  # the Trainer's max_grad_norm, once per step, judged
    assert callback.step == 3
    # The same run declaring one backward pass per step: the second pass is reported.
    strict = record(accumulation_steps=1)
    train(tmp_path, strict, gradient_accumulation_steps=2, max_steps=3)
    assert triples(strict) == [("unexpected_accumulation", 0, "classifier.bias")]


# ---------------------------------------------------------------------- which gradient


def test_checked_gradient_is_the_clipped_one(tmp_path: pathlib.Path) -> None:
    # gradwatch's ceiling (0.01) lies between the healthy norm and the Trainer's clip (1e-3).
    clipped = record(max_grad_norm=0.01)
    train(tmp_path, clipped, max_grad_norm=1e-3, max_steps=3)
    assert clipped.findings == []
    raw = record(max_grad_norm=0.01)
    train(tmp_path, raw, max_grad_norm=0.0, max_steps=3)
    assert {f.kind for f in raw.findings} == {Kind.EXPLODING}
    assert raw.findings[0].step == 0


@pytest.mark.parametrize(
    ("planted", "max_grad_norm", "reported", "everywhere"),
    [
        ("nan", 0.0, Kind.NAN, False),  # no clipping: only the parameter it entered
        ("nan", 1.0, Kind.NAN, True),  # a NaN clip coefficient multiplies every gradient
        ("inf", 0.0, Kind.INF, False),
        ("inf", 1.0, Kind.NAN, False),  # a clip coefficient of 0: inf * 0 is NaN, the rest 0
    ],
)
def test_what_clipping_does_to_a_non_finite_gradient(
    planted: str, max_grad_norm: float, reported: Kind, everywhere: bool, tmp_path: pathlib.Path
) -> None:
    model = tiny_bert()
    embedding = model.bert.embeddings.word_embeddings.weight

    def plant(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = float(planted)
        return grad

    handle = embedding.register_hook(plant)
    callback = record()
    try:
        train(tmp_path, callback, model, max_grad_norm=max_grad_norm, max_steps=1)
    finally:
        handle.remove()
    (finding,) = callback.findings
    assert finding.kind is reported
    if everywhere:
        assert len(finding.params) == len(list(model.parameters()))
    else:
        assert finding.params == ("bert.embeddings.word_embeddings.weight",)


# ---------------------------------------------------------------------- policies, outputs


def test_raise_stops_training_before_the_step(tmp_path: pathlib.Path) -> None:
    model = tiny_bert()
    run = NanLossTrainer(
        model=model,
        args=training_args(tmp_path / "out"),
        train_dataset=RandomTokens(),
        callbacks=[GradWatchCallback(on_finding="raise", log_dir=False)],
        nan_at=2,
    )
    with pytest.raises(GradientError, match=r"\[nan\] step 2: .*'classifier\.bias'"):
        run.train()
    assert run.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the step never ran
    assert hooks_left(model, run.optimizer.optimizer) == NO_HOOKS


@pytest.mark.parametrize("where", ["environment", "explicit", "off"])
def test_where_outputs_go(
    where: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "environment":
        monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    log_dir: Any = {"environment": None, "explicit": tmp_path / "mine", "off": False}[where]
    callback = GradWatchCallback(on_finding="record", log_dir=log_dir)
    train(tmp_path, callback, max_steps=2, report_to=["tensorboard"])
    expected = {"environment": tmp_path / "tb", "explicit": tmp_path / "mine", "off": None}[where]
    assert callback.output_dir == (None if expected is None else str(expected))
    if expected is not None:
        assert (expected / FINDINGS_LOG_NAME).exists()
        assert "gradwatch/grad_norm/total" in scalar_tags(expected)
    if where != "explicit":
        assert not list((tmp_path / "out").rglob(FINDINGS_LOG_NAME))


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"accumulation_steps": 0}, GradWatchValueError,
         r"accumulation_steps must be an int >= 1, got 0"),
        ({"histogram_every": -1}, GradWatchValueError, r"histogram_every must be an int >= 0"),
        ({"on_finding": "explode"}, GradWatchValueError, r"on_finding must be one of 'warn'"),
        ({"on_nonfinite": True}, GradWatchTypeError, r"on_nonfinite must be 'report' or 'skip'"),
        ({"log_dir": 3}, GradWatchTypeError, r"log_dir must be None, a str or an os\.PathLike"),
        ({"explode_factor": 1.0}, GradWatchValueError, r"explode_factor must be a finite number"),
        ({"no_grad_afterr": 3}, GradWatchTypeError, r"got unknown option\(s\) 'no_grad_afterr'"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument_and_the_entry_point(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=ENTRY + match):
        GradWatchCallback(**options)


def test_optimizer_over_none_of_the_parameters(tmp_path: pathlib.Path) -> None:
    stray = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(
        GradWatchValueError, match=ENTRY + r"the Trainer's optimizer updates none of the 25"
    ):
        train(tmp_path, record(), trainer_options={"optimizers": (stray, None)})


# ---------------------------------------------------------------------- imports


def test_importing_gradwatch_does_not_import_transformers() -> None:
    code = (
        "import sys, gradwatch, gradwatch.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'accelerate'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_clear_error_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "gradwatch.transformers")
    for name in ("transformers", "transformers.trainer_callback"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'gradwatch\[transformers\]'"):
        importlib.import_module("gradwatch.transformers")


# ---------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, dict[str, Any]]]:
    """One torchrun launch of tests/helpers/transformers_ddp.py, four trainings in it."""
    out = tmp_path_factory.mktemp("ddp")
    scenarios = ["healthy", "nan", "corrupt", "raise"]
    env = {**os.environ, "PYTHONPATH": str(HELPERS.parent.parent), "OMP_NUM_THREADS": "1"}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(_free_port()), str(HELPERS / "transformers_ddp.py")]
    process = subprocess.Popen(
        [*command, str(out), *scenarios],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the DDP run hung:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    reports: dict[str, dict[int, dict[str, Any]]] = {}
    for scenario in scenarios:
        reports[scenario] = {}
        for rank in (0, 1):
            path = out / scenario / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} wrote no {scenario} report:\n{output[-4000:]}"
            reports[scenario][rank] = json.loads(path.read_text())
    return reports


def _logs(report: dict[str, Any]) -> list[pathlib.Path]:
    """Every findings log under the scenario's output directory."""
    return list(pathlib.Path(report["output_dir"]).parent.rglob(FINDINGS_LOG_NAME))


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_healthy_run_is_silent(ddp: dict[str, dict[int, dict[str, Any]]]) -> None:
    reports = ddp["healthy"]
    for rank in (0, 1):
        assert reports[rank]["distributed"] and reports[rank]["world_size"] == 2
        assert reports[rank]["error"] is None
        assert reports[rank]["findings"] == []
    assert reports[1]["output_dir"] is None  # rank 1 writes nothing
    assert reports[0]["output_dir"].endswith("gradwatch_logs")
    assert read_log(reports[0]["output_dir"]) == []
    assert reports[0]["weights"] == reports[1]["weights"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_nan_loss_on_one_rank_is_reported_once(
    ddp: dict[str, dict[int, dict[str, Any]]],
) -> None:
    # Rank 1's loss is NaN at step 2; DDP's all-reduce carries it into rank 0's gradients, so
    # both ranks find it and both skip the step; rank 0's copy is published.
    reports = ddp["nan"]
    expected = [["nan", "classifier.bias", 2], ["skipped_step", None, 2]]
    for rank in (0, 1):
        assert reports[rank]["error"] is None
        assert reports[rank]["global_step"] == 4
        assert reports[rank]["findings"] == expected
    (log,) = _logs(reports[0])
    assert read_log(log.parent) == [("nan", 2, 0), ("skipped_step", 2, 0)]
    assert reports[0]["weights"] == reports[1]["weights"]  # still in step, and finite
    assert all(value == value for value in reports[0]["weights"])


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_nan_in_one_rank_gradients_names_that_rank(
    ddp: dict[str, dict[int, dict[str, Any]]],
) -> None:
    # Only rank 1's gradient of classifier.weight turns NaN, after the all-reduce.
    reports = ddp["corrupt"]
    for rank in (0, 1):
        assert reports[rank]["error"] is None
        assert reports[rank]["findings"] == [["nan", "classifier.weight", 2]]  # both ranks know
    (log,) = _logs(reports[0])
    assert read_log(log.parent) == [("nan", 2, 1)]  # written once, by rank zero, for rank 1


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_raise_stops_every_rank_at_the_same_step(
    ddp: dict[str, dict[int, dict[str, Any]]],
) -> None:
    reports = ddp["raise"]
    for rank in (0, 1):
        error = reports[rank]["error"]
        assert error is not None and error.startswith("GradientError: [nan] step 2")
        assert "'classifier.weight'" in error
        assert reports[rank]["global_step"] == 3  # after the exchange at the end of step 2
        assert reports[rank]["hooks"] == 0


def test_a_head_kept_in_a_plain_list_is_unregistered(tmp_path: pathlib.Path) -> None:
    class ListHead(nn.Module):
        """A tiny BERT whose extra projection sits in a plain list."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = tiny_bert()
            self.extra = [nn.Linear(2, 2)]

        def forward(
            self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **rest: Any
        ) -> Any:
            out = self.bert(input_ids=input_ids, labels=labels, **rest)
            out.logits = self.extra[0](out.logits)
            return out

    callback = record()
    train(tmp_path, callback, ListHead(), max_steps=2)
    assert triples(callback) == [("unregistered_parameter", 0, "extra[0].bias")]
