"""``replica_divergence`` (gradwatch/detectors/replicas.py): data-parallel replicas whose
gradients differ although DDP should have averaged them. Two gloo processes on CPU, each
watching its ``DistributedDataParallel`` replica; every scenario runs on both, in order, in one
pair of processes with a hard timeout (a hang fails the test).

Bug programs show the bug bites (the replicas' weights differ after training) and pin the
finding; the look-alikes (declared ``no_sync()`` accumulation, ``ZeroRedundancyOptimizer``,
``find_unused_parameters=True``, an fp16 compression hook) stay silent.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from tests.test_distributed import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6

SCENARIOS = [
    "healthy",
    "bypassed",
    "bypassed_every_3",
    "no_sync_left_on",
    "loaded_on_rank0",
    "no_sync_accumulation",
    "zero",
    "find_unused",
    "fp16_compression",
    "ignored",
]

_WORKER = f"""
import contextlib, datetime, json, os, sys
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
import gradwatch

STEPS = {STEPS}
rank = int(os.environ["RANK"])
out_dir = sys.argv[1]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


class Branchy(nn.Module):
    def __init__(self, unused):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        if unused:
            self.sometimes = nn.Linear(8, 1)  # in the forward pass at even steps only

    def forward(self, x, extra=False):
        out = self.body(x)
        return out + self.sometimes(x) if extra else out


results = {{}}
for scenario in sys.argv[2:]:
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = Branchy(unused=scenario == "find_unused")
    ddp = DistributedDataParallel(model, find_unused_parameters=scenario == "find_unused")
    if scenario == "fp16_compression":
        ddp.register_comm_hook(dist.group.WORLD, default_hooks.fp16_compress_hook)
    if scenario == "zero":
        opt = ZeroRedundancyOptimizer(
            list(ddp.parameters()), optimizer_class=torch.optim.SGD, lr=0.05
        )
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    if scenario == "loaded_on_rank0" and rank == 0:
        # A checkpoint loaded on rank 0 only, after DDP broadcast the initial weights.
        with torch.no_grad():
            model.body[0].weight.mul_(1.1)
    micro = 2 if scenario.startswith("no_sync") else 1
    options = {{"on_finding": "record", "accumulation_steps": micro}}
    if scenario == "bypassed_every_3":
        options["replica_every"] = 3
    if scenario == "ignored":
        options["ignore"] = ["replica_divergence"]
    generator = torch.Generator().manual_seed(1 + rank)  # different data on each rank
    with gradwatch.watch(ddp, opt, **options) as watcher:
        for step in range(STEPS):
            opt.zero_grad()
            for m in range(micro):
                x = torch.randn(16, 8, generator=generator)
                y = x.sum(dim=1, keepdim=True).sin()
                last = m == micro - 1
                local = micro > 1 and (not last or scenario == "no_sync_left_on")
                # no_sync() must hold the forward pass too: DDP decides there.
                with ddp.no_sync() if local else contextlib.nullcontext():
                    if scenario.startswith("bypassed") or scenario == "ignored":
                        out = ddp.module(x)  # the wrapper bypassed: no all-reduce
                    else:
                        out = ddp(x, extra=scenario == "find_unused" and step % 2 == 0)
                    nn.functional.mse_loss(out, y).backward()
            opt.step()
    weights = torch.cat([p.detach().flatten() for p in model.body.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    results[scenario] = {{
        "findings": [
            [f.kind.value, f.step, f.param, list(f.params), f.value, f.cause]
            for f in watcher.findings
        ],
        "replicas_differ": not torch.equal(gathered[0], gathered[1]),
        "step": watcher.step,
    }}
    dist.barrier()
with open(os.path.join(out_dir, f"rank{{rank}}.json"), "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("replicas"), SCENARIOS, timeout=240, worker=_WORKER)


def _found(result: dict[str, Any]) -> list[tuple[str, int]]:
    return [(kind, step) for kind, step, *_ in result["findings"]]


@pytest.mark.parametrize("scenario", ["bypassed", "no_sync_left_on"])
def test_gradients_that_were_never_averaged(ranks: list[dict[str, Any]], scenario: str) -> None:
    for rank in ranks:
        result = rank[scenario]
        assert result["replicas_differ"]  # the bug bites: two different models after training
        assert _found(result) == [("replica_divergence", 0)]
        _, _, param, params, value, cause = result["findings"][0]
        assert param == params[0] and param.startswith("module.body.")
        assert value > 1e-3
        assert cause == "gradients"
    # Both ranks name the same parameters: they judge the same reduced norms.
    assert ranks[0][scenario]["findings"] == ranks[1][scenario]["findings"]


def test_weights_loaded_on_one_rank_only(ranks: list[dict[str, Any]]) -> None:
    """DDP averages the gradients, so they agree; the weights do not."""
    for rank in ranks:
        result = rank["loaded_on_rank0"]
        assert result["replicas_differ"]
        assert _found(result) == [("replica_divergence", 0)]
        _, _, param, params, value, cause = result["findings"][0]
        assert (param, params, cause) == (
            "module.body.0.weight",
            ["module.body.0.weight"],
            "weights",
        )
        assert value == pytest.approx(0.1 / 1.1, rel=1e-4)


def test_compared_every_replica_every_checks(ranks: list[dict[str, Any]]) -> None:
    """Checks 0, 3: compared; the finding is made at the first and kept once per parameter."""
    for rank in ranks:
        assert _found(rank["bypassed_every_3"]) == [("replica_divergence", 0)]


@pytest.mark.parametrize(
    "scenario", ["healthy", "no_sync_accumulation", "zero", "find_unused", "fp16_compression"]
)
def test_replicas_kept_in_step_are_silent(ranks: list[dict[str, Any]], scenario: str) -> None:
    for rank in ranks:
        assert not rank[scenario]["replicas_differ"]
        assert rank[scenario]["findings"] == []
        assert rank[scenario]["step"] == STEPS


def test_ignoring_the_kind_makes_no_collective(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert rank["ignored"]["replicas_differ"]
        assert rank["ignored"]["findings"] == []


def test_one_process_compares_nothing(tmp_path: pathlib.Path) -> None:
    import torch
    from torch import nn

    import gradwatch
    from gradwatch import _frontend

    model = nn.Linear(4, 1)
    assert _frontend.replica_reduction(model, 1) is None
    assert _frontend.replica_reduction(model, 2) is None  # not a DistributedDataParallel
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, on_finding="record", replica_every=1) as watcher:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert watcher.findings == []
