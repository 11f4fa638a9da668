"""What the gradient hooks saw: which parameters got gradients, when, and onto what."""

from __future__ import annotations

import threading
import weakref

import torch

from gradwatch._compat import backward_pass_id


class GradientTracker:
    """Per-parameter bookkeeping fed by one hook per parameter; host-side Python state only.

    Parameters are identified by their position in the watcher's parameter table. The hook
    (:meth:`on_accumulated`) runs right after autograd has accumulated a backward pass into
    ``.grad``; :meth:`on_stepped` runs right after an optimizer step.

    A ``.grad`` is recognised across calls by a weak reference plus its ``_version`` counter, which
    every in-place change (``zero_()``, ``mul_()`` from clipping, ``+=`` from accumulation) bumps.
    When the tensor the optimizer stepped with comes back exactly one accumulation later, nobody
    reset it in between: a missing ``zero_grad``. No tensor values are read, so nothing syncs.
    """

    def __init__(self, num_params: int) -> None:
        self._lock = threading.Lock()
        self._current_pass = backward_pass_id()
        self._pass_id: int | None = None
        self._position = 0
        self._sequence = 0
        # (grad, its _version then, whether an optimizer step recorded it)
        self._last: list[tuple[weakref.ref[torch.Tensor], int, bool] | None] = [None] * num_params
        self.passes_into = [0] * num_params
        """Backward passes accumulated into each current ``.grad`` since it was last reset."""
        self.stale = [False] * num_params
        """Whether each current ``.grad`` still holds what the last optimizer step used."""
        self.received = [False] * num_params
        """Whether each parameter has ever received a gradient."""
        self.received_count = 0
        self.arrival = [0] * num_params
        """Global sequence number of each parameter's latest gradient (smaller = earlier)."""
        self.last_pass = [-1] * num_params
        """Index of the backward pass that last reached each parameter."""
        self.first_position = [-1] * num_params
        """Position in its first backward pass (0 = first gradient computed, nearest the loss)."""
        self.backward_passes = 0
        """Backward passes seen that reached at least one watched parameter."""

    def on_accumulated(self, index: int, grad: torch.Tensor) -> None:
        # Runs once per parameter per backward pass: kept to plain list and int operations.
        pass_id = self._current_pass()
        version = grad._version
        with self._lock:
            if pass_id != self._pass_id:
                self._pass_id = pass_id
                self._position = 0
                self.backward_passes += 1
            last = self._last[index]
            if last is not None and version == last[1] + 1 and last[0]() is grad:
                if last[2]:
                    self.stale[index] = True
                    self.passes_into[index] = 1
                else:
                    self.passes_into[index] += 1
            else:
                self.stale[index] = False
                self.passes_into[index] = 1
            self._last[index] = (weakref.ref(grad), version, False)
            if not self.received[index]:
                self.received[index] = True
                self.received_count += 1
                self.first_position[index] = self._position
            self._position += 1
            self._sequence += 1
            self.arrival[index] = self._sequence
            self.last_pass[index] = self.backward_passes - 1

    def on_stepped(self, indices: list[int], grads: list[torch.Tensor | None]) -> None:
        with self._lock:
            for index, grad in zip(indices, grads, strict=True):
                self.stale[index] = False
                self.passes_into[index] = 0
                self._last[index] = (
                    None if grad is None else (weakref.ref(grad), grad._version, True)
                )

    def state_dict(self) -> dict[str, object]:
        return {
            "received": list(self.received),
            "first_position": list(self.first_position),
            "backward_passes": self.backward_passes,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        received = list(state["received"])  # type: ignore[call-overload]
        if len(received) != len(self.received):
            raise ValueError("state was saved for a model with a different number of parameters")
        self.received = [bool(r) for r in received]
        self.received_count = sum(self.received)
        self.first_position = [int(p) for p in state["first_position"]]  # type: ignore[attr-defined]
        self.backward_passes = int(state["backward_passes"])  # type: ignore[call-overload]
