"""A tiny CPU ``Trainer.fit`` for the tests: synthetic regression batches, no logger, no
checkpoints, no progress bar."""

from __future__ import annotations

import pathlib
from types import ModuleType
from typing import Any

import torch


def loader(batches: int = 32, batch_size: int = 16, seed: int = 0) -> Any:
    """``batches`` batches of ``(x, sin(sum(x)))``, ``x`` of 8 features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 8, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def fit(
    pl: ModuleType,
    module: Any,
    callbacks: Any,
    tmp_path: pathlib.Path,
    *,
    steps: int = 12,
    data: Any = None,
    ckpt_path: str | None = None,
    **trainer_options: Any,
) -> Any:
    """``pl.Trainer(...).fit(module, data)`` for ``steps`` steps (``data``: :func:`loader`'s
    default); the trainer."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "log_every_n_steps": 1,
        **trainer_options,
    }
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, loader() if data is None else data, ckpt_path=ckpt_path)
    return trainer
