"""The benchmarks run end to end and print a row for every variant (no timing checks)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradwatch_overhead_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_prints_every_variant_for_every_model(tmp_path: Path) -> None:
    output = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    overhead = _load()
    table = result.stdout
    assert output.read_text().strip() == table.strip()
    for model in overhead.CPU_MODELS:
        assert f"## {model}:" in table
    for spec in overhead.VARIANTS:
        rows = [line for line in table.splitlines() if line.startswith(f"| {spec.label} |")]
        assert len(rows) == len(overhead.CPU_MODELS), (spec.key, table)
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "skipped: wandb is not installed" in table
    assert "Extra cost per parameter tensor per step" in table
    assert "Peak RSS (separate processes): baseline" in table


def test_unknown_variant_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--variants", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "unknown model or variant 'nope'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_a_device_says_so() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--device cuda needs a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


def test_machine_name() -> None:
    name = _load().machine_name(torch.device("cpu"))
    prefix, cores, arch = name.split("-", 2)
    assert prefix == "cpu"
    assert cores.endswith("core") and int(cores[: -len("core")]) >= 1
    assert arch and arch == arch.lower()


def test_gradient_flow_benchmark_prints_every_workload() -> None:
    pytest.importorskip("PIL")
    script = SCRIPT.parent / "gradient_flow.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--no-reference"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| 6 modules",
        "| 24 modules",
        "| 64 modules",
        "| 1,000 tensors (500 modules)",
    ]
    assert rows[-1].split(" | ")[1] == "63"  # bars


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_replica_benchmark_prints_every_variant(tmp_path: Path) -> None:
    script = SCRIPT.parent / "ddp_replicas.py"
    output = tmp_path / "ddp.md"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    table = output.read_text()
    for variant in ("unwatched", "replicas not compared", "replicas compared every step"):
        assert re.search(rf"\| [^|]*{variant} \| \d+\.\d{{3}}x \|", table), table
