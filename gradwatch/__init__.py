"""gradwatch: catch gradient bugs in PyTorch training as they happen.

Example:
    >>> import torch, gradwatch
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gradwatch.watch(model, opt) as watcher:
    ...     opt.zero_grad()
    ...     model(torch.ones(4, 3)).sum().backward()
    ...     opt.step()
    >>> watcher.findings
    []
"""

from gradwatch._version import __version__
from gradwatch.findings import (
    Finding,
    GradientError,
    GradWatchError,
    GradWatchWarning,
    Kind,
)
from gradwatch.watcher import Watcher, watch

__all__ = [
    "Finding",
    "GradWatchError",
    "GradWatchWarning",
    "GradientError",
    "Kind",
    "Watcher",
    "__version__",
    "watch",
]
