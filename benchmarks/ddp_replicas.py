"""What the replica_divergence comparison costs under DistributedDataParallel.

Two gloo processes on the CPU train one MLP under DDP. Each round times a few steps of every
variant (after 2 untimed ones), interleaved, in the same processes:

- unwatched: the baseline;
- gradwatch, replicas not compared (``ignore=["replica_divergence"]``): no collective;
- gradwatch, compared every 10 checks (the default);
- gradwatch, compared at every check (``replica_every=1``): one all-reduce of four values per
  parameter tensor (two for its gradient, two for its weight) at every step, the worst case.

It prints, per variant, the median over rounds of (variant ms/step) / (baseline ms/step of the
same round). Ratios, not times: never a pass/fail check.

    python benchmarks/ddp_replicas.py [--rounds 7] [--steps 20] [--output FILE] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "unwatched": None,
    "gradwatch, replicas not compared": {"ignore": ["replica_divergence"]},
    "gradwatch, replicas compared every 10 checks (default)": {"replica_every": 10},
    "gradwatch, replicas compared every step": {"replica_every": 1},
}


def _rank(out: str, rounds: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.ReLU())])
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 256, generator=generator)

    def run(options: dict[str, object] | None) -> float:
        watcher = gradwatch.watch(ddp, opt, on_finding="record", **options) if options else None

        def step() -> None:
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()

        for _ in range(2):  # the first forward passes are probed: not the steady state
            step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        dist.barrier()
        elapsed = (time.perf_counter() - start) / steps
        if watcher is not None:
            watcher.close()
        return elapsed

    run(None)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        times = {name: run(options) for name, options in VARIANTS.items()}
        for name in VARIANTS:
            ratios[name].append(times[name] / times["unwatched"])
        ratios.setdefault("_baseline_ms", []).append(times["unwatched"] * 1e3)
    if rank == 0:
        Path(out).write_text(json.dumps(ratios))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (a smoke run)")
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.steps)
    if args.rank_out:
        _rank(args.rank_out, rounds, steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ratios.json")
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": "2",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, __file__, "--rank-out", out]
        command += ["--quick"] if args.quick else ["--rounds", str(rounds), "--steps", str(steps)]
        procs = [
            subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(2)
        ]
        for proc in procs:
            if proc.wait(timeout=1800) != 0:
                sys.exit(f"a rank failed (exit {proc.returncode})")
        ratios = json.loads(Path(out).read_text())
    baseline = statistics.median(ratios.pop("_baseline_ms"))
    lines = [
        "## ddp: 2 gloo processes, 6 x Linear(256, 256), batch 64 per rank, SGD",
        "",
        f"{rounds} rounds of {steps} steps per variant, interleaved; unwatched step "
        f"{baseline:.2f} ms (median).",
        "",
        "| variant | ratio | spread |",
        "|---|---:|---:|",
    ]
    for name, values in ratios.items():
        lines.append(
            f"| {name} | {statistics.median(values):.3f}x | {min(values):.3f}-{max(values):.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
