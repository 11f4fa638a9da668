"""DistributedDataParallel without Lightning: two gloo processes on CPU, each watching its own
replica; the detectors see the all-reduced gradients the optimizer uses."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = pathlib.Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
STEPS = 12
NAN_STEP = 6
NO_ZERO_GRAD_STEP = 4

# Each scenario: (name, what to plant). Every rank runs all of them, in order, in one process.
SCENARIOS = [
    "healthy",
    "healthy_module",
    "nan_on_rank1",
    "nan_on_rank1_module",
    "nan_on_rank1_bucket_view",
    "no_zero_grad_on_both",
    "no_zero_grad_on_rank1",
]

_WORKER = f"""
import datetime, json, os, sys
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import gradwatch

STEPS, NAN_STEP, NO_ZERO_GRAD_STEP = {STEPS}, {NAN_STEP}, {NO_ZERO_GRAD_STEP}
rank = int(os.environ["RANK"])
out_dir = sys.argv[1]
scenarios = sys.argv[2:]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
results = {{}}
for scenario in scenarios:
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    ddp = DistributedDataParallel(model, gradient_as_bucket_view="bucket_view" in scenario)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    watched = ddp.module if "module" in scenario else ddp
    generator = torch.Generator().manual_seed(1 + rank)  # different data on each rank
    with gradwatch.watch(watched, opt, on_finding="record") as watcher:
        for step in range(STEPS):
            x = torch.randn(16, 8, generator=generator)
            y = x.sum(dim=1, keepdim=True).sin()
            skip_zero = step == NO_ZERO_GRAD_STEP and (
                scenario == "no_zero_grad_on_both"
                or (scenario == "no_zero_grad_on_rank1" and rank == 1)
            )
            if not skip_zero:
                opt.zero_grad()
            if scenario.startswith("nan_on_rank1") and step == NAN_STEP and rank == 1:
                x[0, 0] = float("nan")
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            if step == NAN_STEP and scenario.startswith("nan"):
                break  # the weights are NaN from here on
    results[scenario] = {{
        "findings": [[f.kind.value, f.step, f.param, list(f.params)] for f in watcher.findings],
        "param_names": watcher.param_names,
        "step": watcher.step,
    }}
    dist.barrier()
with open(os.path.join(out_dir, f"rank{{rank}}.json"), "w") as f:
    json.dump(results, f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(
    tmp_path: pathlib.Path, scenarios: list[str], timeout: float, worker: str = _WORKER
) -> list[Any]:
    """Run ``worker`` on every rank (gloo, CPU) with ``scenarios``; each rank's JSON results.
    A rank still running after ``timeout`` seconds fails the test (a hang)."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD_SIZE),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), *scenarios],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs: list[str] = []
    try:
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"a rank did not finish within {timeout} s (hang?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("ddp"), SCENARIOS, timeout=240)


def _kinds_steps(result: dict[str, Any]) -> list[tuple[str, int]]:
    return [(kind, step) for kind, step, _, _ in result["findings"]]


@pytest.mark.parametrize("scenario", ["healthy", "healthy_module"])
def test_healthy_run_is_silent_on_both_ranks(ranks: list[dict[str, Any]], scenario: str) -> None:
    for rank in ranks:
        assert rank[scenario]["findings"] == []
        assert rank[scenario]["step"] == STEPS


def test_param_names_of_the_wrapper_and_of_the_module(ranks: list[dict[str, Any]]) -> None:
    module_names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    for rank in ranks:
        assert rank["healthy_module"]["param_names"] == module_names
        assert rank["healthy"]["param_names"] == [f"module.{n}" for n in module_names]


@pytest.mark.parametrize(
    "scenario", ["nan_on_rank1", "nan_on_rank1_module", "nan_on_rank1_bucket_view"]
)
def test_nan_on_one_rank_is_found_on_both_after_all_reduce(
    ranks: list[dict[str, Any]], scenario: str
) -> None:
    rank0, rank1 = (r[scenario] for r in ranks)
    assert _kinds_steps(rank0) == _kinds_steps(rank1) == [("nan", NAN_STEP)]
    # Both ranks hold the same averaged gradients: the same parameters are named.
    assert rank0["findings"][0][3] == rank1["findings"][0][3]
    assert len(rank0["findings"][0][3]) == 4
    assert rank0["step"] == rank1["step"] == NAN_STEP + 1


def test_missing_zero_grad_on_both_ranks(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert _kinds_steps(rank["no_zero_grad_on_both"]) == [
            ("missing_zero_grad", NO_ZERO_GRAD_STEP)
        ]


def test_missing_zero_grad_on_one_rank_is_found_there_without_a_hang(
    ranks: list[dict[str, Any]],
) -> None:
    # The fixture's bounded wait proves nobody hung; the rank that kept its gradients reports it,
    # the other one, whose own .grad was reset, does not.
    rank0, rank1 = (r["no_zero_grad_on_rank1"] for r in ranks)
    assert _kinds_steps(rank1) == [("missing_zero_grad", NO_ZERO_GRAD_STEP)]
    assert _kinds_steps(rank0) == []
    assert rank0["step"] == rank1["step"] == STEPS
