"""What gradwatch writes, read back through a real TensorBoard server's HTTP data API."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from tests.helpers.models import mlp, regression_batch

TENSORBOARD = pathlib.Path(sys.executable).with_name("tensorboard")
STEPS = 12
HISTOGRAM_EVERY = 5
NAN_AT = 7
DEADLINE_S = 120.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not TENSORBOARD.exists(), reason=f"no tensorboard binary next to Python at {TENSORBOARD}"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_run(log_dir: pathlib.Path) -> list[str]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(
        model, opt, log_dir=log_dir, histogram_every=HISTOGRAM_EVERY, on_finding="record"
    ) as watcher:
        for step in range(STEPS):
            x, y = regression_batch(generator=generator)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if step == NAN_AT:
                loss = loss * torch.tensor(float("nan"))
            loss.backward()
            opt.step()
            if step == NAN_AT:
                with torch.no_grad():  # keep training finite after the planted NaN step
                    for p in model.parameters():
                        p.nan_to_num_(nan=0.0)
    assert [f.kind.value for f in watcher.findings] == ["nan"]
    return [n for n, _ in model.named_parameters()]


class Server:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **query: object) -> bytes:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            body: bytes = response.read()
            return body

    def json(self, path: str, **query: object) -> Any:
        return json.loads(self.get(path, **query))

    def wait_for(self, path: str, ready: Any, what: str) -> Any:
        """Polls ``path`` until ``ready(data)`` holds (TensorBoard loads event files lazily)."""
        deadline = time.monotonic() + DEADLINE_S
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = self.json(path)
                if ready(last):
                    return last
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as error:
                last = error
            time.sleep(0.5)
        raise AssertionError(f"TensorBoard never served {what} at {path}; last answer: {last!r}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[str]]]:
    log_dir = tmp_path_factory.mktemp("runs")
    names = _write_run(log_dir)
    port = _free_port()
    process = subprocess.Popen(
        [
            str(TENSORBOARD),
            "--logdir",
            str(log_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        server = Server(port)
        server.wait_for(
            "/data/plugin/histograms/tags", lambda tags: "." in tags, "the run's histograms"
        )
        yield server, names
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_plugins_are_active(served: tuple[Server, list[str]]) -> None:
    server, _ = served
    plugins = server.json("/data/plugins_listing")
    for plugin in ["scalars", "histograms", "distributions", "images", "text", "custom_scalars"]:
        assert plugins[plugin]["enabled"], plugin


def test_scalars(served: tuple[Server, list[str]]) -> None:
    server, names = served
    tags = server.json("/data/plugin/scalars/tags")["."]
    total = server.json("/data/plugin/scalars/scalars", run=".", tag="gradwatch/grad_norm/total")
    # [wall_time, step, value] per point; the NaN step has no finite total.
    assert [p[1] for p in total] == [s for s in range(STEPS) if s != NAN_AT]
    assert all(p[2] > 0 for p in total)
    for name in names:
        assert f"gradwatch/grad_norm/{name}" in tags
        nan_counts = server.json(
            "/data/plugin/scalars/scalars", run=".", tag=f"gradwatch/grad_nan/{name}"
        )
        assert [p[1] for p in nan_counts] == [0, 5, 10]
        assert [p[2] for p in nan_counts] == [0, 0, 0]
    nan_findings = server.json(
        "/data/plugin/scalars/scalars", run=".", tag="gradwatch/findings/nan"
    )
    assert [(p[1], p[2]) for p in nan_findings] == [(NAN_AT, 1)]


def test_histograms(served: tuple[Server, list[str]]) -> None:
    server, names = served
    tags = server.json("/data/plugin/histograms/tags")["."]
    assert set(tags) == {f"gradwatch/grad/{n}" for n in names}
    for name in names:
        events = server.json(
            "/data/plugin/histograms/histograms", run=".", tag=f"gradwatch/grad/{name}"
        )
        # [wall_time, step, [[left, right, count], ...]] per step
        assert [e[1] for e in events] == list(range(0, STEPS, HISTOGRAM_EVERY))
        for _, _, buckets in events:
            counts = [b[2] for b in buckets]
            assert sum(counts) > 0
            lefts = [b[0] for b in buckets]
            assert lefts == sorted(lefts)
            assert all(b[0] <= b[1] for b in buckets)
            assert all(abs(b[0]) < 1e3 and abs(b[1]) < 1e3 for b in buckets)


def test_findings_text(served: tuple[Server, list[str]]) -> None:
    server, _ = served
    assert server.json("/data/plugin/text/tags")["."] == ["gradwatch/findings"]
    (entry,) = server.json("/data/plugin/text/text", run=".", tag="gradwatch/findings")
    assert entry["step"] == NAN_AT
    # Markdown rendered to HTML: "**nan** `<param>`: <message>"
    assert "<strong>nan</strong>" in entry["text"]
    assert "NaN" in entry["text"]


def test_gradient_flow_image(served: tuple[Server, list[str]]) -> None:
    pytest.importorskip("PIL")
    server, _ = served
    assert "gradwatch/grad_flow" in server.json("/data/plugin/images/tags")["."]
    (image,) = server.json(
        "/data/plugin/images/images", run=".", tag="gradwatch/grad_flow", sample=0
    )
    assert image["step"] == 0
    png = server.get("/data/plugin/images/individualImage?" + image["query"])
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_custom_scalars_layout(served: tuple[Server, list[str]]) -> None:
    server, _ = served
    layout = server.json("/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert "gradwatch: gradient norm by module" in titles
    by_module = layout["category"][titles.index("gradwatch: gradient norm by module")]
    assert [chart["title"] for chart in by_module["chart"]] == ["0", "2", "4"]
