"""What the gradient hooks saw: which parameters got gradients, when, and onto what."""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Mapping

import torch

from gradwatch import _state
from gradwatch._compat import backward_pass_id
from gradwatch.findings import GradWatchValueError

_Event = tuple[int, "weakref.ref[torch.Tensor]", int, int]


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
        # What the hook saw, replayed into the fields below when one of them is read:
        # (position, weak reference to the .grad, its _version, backward pass id).
        self._events: collections.deque[_Event] = collections.deque()
        self._replay_at = max(4096, 64 * num_params)
        self._pass_id: int | None = None
        self._position = 0
        self._sequence = 0
        # (grad, its _version then, whether an optimizer step recorded it)
        self._last: list[tuple[weakref.ref[torch.Tensor], int, bool] | None] = [None] * num_params
        self._passes_into = [0] * num_params
        self._stale = [False] * num_params
        self._received = [False] * num_params
        self._received_count = 0
        self._arrival = [0] * num_params
        self._last_pass = [-1] * num_params
        self._first_position = [-1] * num_params
        self._backward_passes = 0
        # Backward passes begun since the last optimizer step, counted by the hook itself (the
        # replay may not run for a long time when no step comes), and what to call once they are
        # more than _alarm_after.
        self._hook_pass: int | None = None
        self.unstepped = 0
        self._alarm_after: int | None = None
        self._alarm: Callable[[], Callable[[], None] | None] | None = None
        # Backward passes that reached the parameters of each optimizer (by its group number),
        # and the latest pass counted for it.
        self._group_of = [-1] * num_params
        self._group_passes: list[int] = []
        self._group_pass: list[int] = []

    def set_alarm(self, after: int, alarm: Callable[[], None]) -> None:
        """Call ``alarm()`` from the hook when a backward pass begins while more than ``after``
        earlier ones had no :meth:`reset_unstepped` after them, and again every ``after``
        passes until the next reset."""
        # Held weakly: the parameters' hooks hold this tracker, and a strong reference to
        # the monitor here would keep the parameters alive through it (a cycle through
        # autograd's C++ hooks, which the garbage collector cannot see).
        self._alarm_after = after
        self._alarm = weakref.WeakMethod(alarm) if hasattr(alarm, "__self__") else lambda: alarm

    def set_group(self, positions: list[int], group: int) -> None:
        """Count the backward passes that reach ``positions`` as passes into the optimizer
        numbered ``group`` (:meth:`group_passes`); a position belongs to one group, the latest
        set."""
        self.replay()
        with self._lock:
            grow = group + 1 - len(self._group_passes)
            if grow > 0:
                self._group_passes.extend([0] * grow)
                self._group_pass.extend([-1] * grow)
            for i in positions:
                self._group_of[i] = group

    def group_passes(self, group: int) -> int:
        """Backward passes that reached at least one parameter of the optimizer numbered
        ``group`` since it was set (each pass counted once)."""
        self.replay()
        return self._group_passes[group] if group < len(self._group_passes) else 0

    def in_latest_pass(self, group: int) -> bool:
        """Whether the latest backward pass reached a parameter of ``group``."""
        self.replay()
        return group < len(self._group_pass) and self._group_pass[group] == self._backward_passes

    def reset_unstepped(self) -> None:
        """An optimizer step: the passes so far were used."""
        self.unstepped = 0

    @property
    def passes_into(self) -> list[int]:
        """Backward passes accumulated into each current ``.grad`` since it was last reset."""
        self.replay()
        return self._passes_into

    @property
    def stale(self) -> list[bool]:
        """Whether each current ``.grad`` still holds what the last optimizer step used."""
        self.replay()
        return self._stale

    @property
    def received(self) -> list[bool]:
        """Whether each parameter has ever received a gradient."""
        self.replay()
        return self._received

    @property
    def received_count(self) -> int:
        self.replay()
        return self._received_count

    @property
    def arrival(self) -> list[int]:
        """Global sequence number of each parameter's latest gradient (smaller = earlier)."""
        self.replay()
        return self._arrival

    @property
    def last_pass(self) -> list[int]:
        """Index of the backward pass that last reached each parameter."""
        self.replay()
        return self._last_pass

    @property
    def first_position(self) -> list[int]:
        """Position in its first backward pass (0 = first gradient computed, nearest the loss)."""
        self.replay()
        return self._first_position

    @property
    def backward_passes(self) -> int:
        """Backward passes seen that reached at least one watched parameter."""
        self.replay()
        return self._backward_passes

    def on_accumulated(self, index: int, param: torch.Tensor) -> None:
        # Runs once per parameter per backward pass, possibly on an autograd worker thread: it
        # only appends (atomic on a deque), and the bookkeeping waits for the next read.
        grad = param.grad
        if grad is None:
            return
        pass_id = self._current_pass()
        if pass_id != self._hook_pass:  # the first gradient of a backward pass
            self._hook_pass = pass_id
            self.unstepped += 1
            after = self._alarm_after
            if (
                after is not None
                and self.unstepped >= after + 2
                and (self.unstepped - after - 2) % after == 0
                and self._alarm is not None
                and (alarm := self._alarm()) is not None
            ):
                alarm()
        self._events.append((index, weakref.ref(grad), grad._version, pass_id))
        if len(self._events) > self._replay_at:  # backward after backward with no check
            self.replay()

    def replay(self) -> None:
        """Applies the gradients seen since the last call to the fields, in arrival order."""
        events = self._events
        if not events:
            return
        with self._lock:
            last_seen = self._last
            group_of, group_pass, group_passes = (
                self._group_of,
                self._group_pass,
                self._group_passes,
            )
            while events:
                index, ref, version, pass_id = events.popleft()
                if pass_id != self._pass_id:
                    self._pass_id = pass_id
                    self._position = 0
                    self._backward_passes += 1
                last = last_seen[index]
                # weakref.ref returns the existing reference to a live tensor: the same
                # reference object means the same tensor.
                if last is not None and version == last[1] + 1 and last[0] is ref:
                    if last[2]:
                        self._stale[index] = True
                        self._passes_into[index] = 1
                    else:
                        self._passes_into[index] += 1
                else:
                    self._stale[index] = False
                    self._passes_into[index] = 1
                last_seen[index] = (ref, version, False)
                if not self._received[index]:
                    self._received[index] = True
                    self._received_count += 1
                    self._first_position[index] = self._position
                self._position += 1
                self._sequence += 1
                self._arrival[index] = self._sequence
                self._last_pass[index] = self._backward_passes - 1
                group = group_of[index]
                if group >= 0 and group_pass[group] != self._backward_passes:
                    group_pass[group] = self._backward_passes
                    group_passes[group] += 1

    def changed_since_accumulated(self, index: int, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is the tensor the latest backward pass accumulated into for
        ``index``, changed in place since (``zero_()``, clipping's ``mul_()``, unscaling).

        ``False`` when an optimizer step has recorded the parameter's ``.grad`` since that
        accumulation. Reads ``_version`` counters only, no tensor values: nothing syncs.
        """
        self.replay()
        last = self._last[index]
        if last is None or last[2]:
            return False
        return last[0]() is grad and grad._version != last[1]

    def used_by_step(self, index: int, grad: torch.Tensor | None) -> bool:
        """Whether ``grad`` is exactly what the latest optimizer step recorded for ``index``: the
        same tensor, not changed in place since, with no backward pass into it since."""
        self.replay()
        last = self._last[index]
        return (
            grad is not None
            and last is not None
            and last[2]
            and last[0]() is grad
            and (grad._version == last[1])
        )

    @property
    def sequence(self) -> int:
        """Gradients seen so far (each one's :attr:`arrival` is its number in this count)."""
        self.replay()
        return self._sequence

    def on_stepped(self, indices: list[int], grads: list[torch.Tensor | None]) -> None:
        self.replay()
        with self._lock:
            for index, grad in zip(indices, grads, strict=True):
                self._stale[index] = False
                self._passes_into[index] = 0
                self._last[index] = (
                    None if grad is None else (weakref.ref(grad), grad._version, True)
                )

    def state_dict(self) -> dict[str, object]:
        self.replay()
        return {
            "received": list(self.received),
            "first_position": list(self.first_position),
            "backward_passes": self.backward_passes,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` saved; every field is checked before any changes.

        Raises:
            GradWatchTypeError: A field has the wrong type (the message names it).
            GradWatchValueError: A field has a value that is not allowed: flags or positions for
                another number of parameters, a position out of range, a negative count. The
                tracker is then left as it was.
        """
        received, first_position, backward_passes = self._checked_state(state)
        self.replay()
        with self._lock:
            self._received = received
            self._received_count = sum(received)
            self._first_position = first_position
            self._backward_passes = backward_passes

    def _checked_state(self, state: object) -> tuple[list[bool], list[int], int]:
        fields = _state.fields(state, ("received", "first_position", "backward_passes"))
        count = len(self._received)
        for name in ("received", "first_position"):
            value = fields[name]
            if isinstance(value, (list, tuple)) and len(value) != count:
                raise GradWatchValueError(
                    f"{name} has length {len(value)}, expected {count} (one per parameter): "
                    f"the state was saved for a model with a different number of parameters"
                )
        received = [
            _state.flag(f"received[{i}]", r)
            for i, r in enumerate(_state.sequence("received", fields["received"], count))
        ]
        positions = _state.sequence("first_position", fields["first_position"], count)
        first_position = [
            _state.integer(f"first_position[{i}]", p, -1, count - 1)
            for i, p in enumerate(positions)
        ]
        for i, (got, position) in enumerate(zip(received, first_position, strict=True)):
            if got != (position >= 0):
                raise GradWatchValueError(
                    f"first_position[{i}] must be -1 exactly where received[{i}] is False (a "
                    f"parameter that never received a gradient has no position), got {position} "
                    f"with received[{i}] {got}"
                )
        backward_passes = _state.integer("backward_passes", fields["backward_passes"])
        return received, first_position, backward_passes
