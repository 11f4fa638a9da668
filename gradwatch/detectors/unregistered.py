"""Trainable tensors the model uses but does not own (see :mod:`gradwatch._probe`).

Layers in a plain Python ``list`` or ``dict``, modules or ``nn.Parameter`` objects created in
``forward``, plain tensor attributes with ``requires_grad=True``: no optimizer built from
``model.parameters()`` updates them and ``state_dict()`` does not save them. Reported from what
the probe of the model's first forward passes found (:attr:`CheckContext.unregistered`).
"""

from __future__ import annotations

from types import MappingProxyType

from gradwatch.detectors.base import CheckContext, Detector, Phase
from gradwatch.findings import Finding, Kind, _names, _plural


def _unregistered(f: Finding) -> str:
    return (
        f"{_names(f)} {_plural(f, 'takes', 'take')} part in the model's forward pass and "
        f"{_plural(f, 'gets', 'get')} gradients, but {_plural(f, 'is', 'are')} not registered "
        f"with the model: model.parameters() does not list {_plural(f, 'it', 'them')}, so no "
        f"optimizer built from it updates {_plural(f, 'it', 'them')} and state_dict() does not "
        f"save {_plural(f, 'it', 'them')}. Keep layers in nn.ModuleList or nn.ModuleDict (not a "
        f"list or dict), create modules and nn.Parameter objects in __init__ (not in forward), "
        f"and make a trainable tensor an nn.Parameter (or a buffer, if it is not trained)."
    )


class UnregisteredDetector(Detector):
    """Reports ``unregistered_parameter``: at the first check after a forward pass in which the
    probe found trainable tensors the model does not own, one finding naming them all (each
    tensor once in a run).

    Healthy look-alikes stay silent: a frozen teacher or EMA model called inside ``forward``
    (no gradient, or under ``torch.no_grad()``), ``torch.func.functional_call`` with the
    model's own parameters, weight tying and shared modules (the same tensors),
    parametrizations (their ``original`` tensors are registered), registered adapters (LoRA),
    inputs given with ``requires_grad=True``, and tensors a watched optimizer holds.
    """

    name = "unregistered"
    kinds = MappingProxyType({Kind.UNREGISTERED_PARAMETER: _unregistered})
    phase = Phase.AT_CHECK

    def check(self, ctx: CheckContext) -> list[Finding]:
        if not ctx.unregistered:
            return []
        names = tuple(u.name for u in ctx.unregistered)
        return [
            Finding(
                Kind.UNREGISTERED_PARAMETER,
                ctx.step,
                names[0],
                value=float(len(names)),
                params=names,
            )
        ]
