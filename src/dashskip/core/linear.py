"""A projection runnable in every execution state: the model's own weights plus forms made on first use.

The weights stay the model's tensors, read and never modified (the wrapped transformers model computes exactly
what it computed before). A state's form (INT8 codes, INT4 groups, ...) is made by its handler the first time a
row runs in that state, and the layout of a kernel the first time that kernel is chosen; both are dropped and
remade when a weight changes (in place or by new storage). Rows of one call in different states are grouped per
state, run together and scattered back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dashskip.core import kernels as K
from dashskip.core.context import Rows
from dashskip.core.handlers import Handler
from dashskip.core.states import spec


def _source(weight: torch.Tensor) -> tuple[int, int]:
    """What a form was made from: storage and in-place version (`.to()`, `load_state_dict`, `mul_`, ...);
    tensors made under inference mode have no version counter and cannot change in place."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version


class Linear:
    """`x @ W^T + b` for one weight or several fused ones (outputs side by side), in any registered state."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None) -> None:
        self.weights = list(weights)
        self.in_features = self.weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in self.weights)
        parts = list(biases) if biases is not None else [None] * len(self.weights)
        self.biases = parts
        self.forms: dict[str, Any] = {}  # handler name -> its form
        self.prepared: dict[tuple[str, str], Any] = {}  # (handler, kernel) -> layout
        self.made_from: tuple | None = None
        self.bias: torch.Tensor | None = None  # the parts' biases side by side (zeros for a part without)

    def current(self) -> tuple:
        """What the weights are now (each one's storage and in-place version): `sources()` without remaking."""
        return tuple(_source(t) for t in [*self.weights, *(b for b in self.biases if b is not None)])

    def _check_source(self) -> None:
        source = self.current()
        if source != self.made_from:
            self.forms.clear()
            self.prepared.clear()
            self.made_from = source
            self.bias = None
            if any(b is not None for b in self.biases):
                parts = zip(self.biases, self.weights, strict=True)
                self.bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in parts]).detach()

    def form(self, handler: Handler) -> Any:
        self._check_source()
        if handler.name not in self.forms:
            self.forms[handler.name] = handler.quantize(self.weights)
        return self.forms[handler.name]

    def dequantized(self, state: int) -> torch.Tensor:
        """The fp32 weight (out_features, in_features) `state` multiplies with."""
        handler = spec(state).handler
        return handler.dequantize(self.form(handler))

    def kernel_for(self, handler: Handler, flat: torch.Tensor) -> tuple[str, Any]:
        """The kernel measured fastest here for rows like `flat` (rows, in), and the form laid out for it."""
        form = self.form(handler)
        kernel = K.CHOICE.pick(
            handler.name, (self.out_features, self.in_features), flat.shape[0], handler.kernels(flat),
            _Timer(handler, self.out_features, self.in_features, flat.shape[0]),
        )  # fmt: skip
        key = (handler.name, kernel)
        if key not in self.prepared:
            self.prepared[key] = handler.prepare(kernel, form)
        return kernel, self.prepared[key]

    def run_handler(self, handler: Handler, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        kernel, prepared = self.kernel_for(handler, flat)
        out = handler.run(kernel, prepared, flat, self.out_features)
        out = out if self.bias is None else out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def native(self, state: int, rows: int) -> tuple[str, list[torch.Tensor], int, torch.Tensor | None] | None:
        """What the compiled decoder layer needs to run this projection for `rows` fp32 rows in `state` with the
        kernel chosen for them (kind, tensors, out_features, bias), or None where that kernel has no native form."""
        handler = spec(state).handler
        found = handler.native(*self.kernel_for(handler, torch.empty(rows, self.in_features)))
        return None if found is None else (*found, self.out_features, self.bias)

    def sources(self) -> tuple:
        """What the forms were made from; a change means every form (and whatever holds one) is stale."""
        self._check_source()
        return self.made_from

    def __call__(self, state: int, x: torch.Tensor) -> torch.Tensor:
        """All rows of `x` in one state (not skip: a skipped layer runs no linear)."""
        return self.run_handler(spec(state).handler, x)

    def rows(self, rows: Rows, x: torch.Tensor, skipped: torch.Tensor | None = None) -> torch.Tensor:
        """Each row of `x` (..., in) in its own state; rows of skipped states get `skipped` (default zeros)."""
        if rows.uniform is not None and not spec(rows.uniform).skips:
            return self(rows.uniform, x)
        flat = x.reshape(-1, self.in_features)
        out = flat.new_zeros(flat.shape[0], self.out_features) if skipped is None else skipped
        for state, index in rows.groups:
            if not spec(state).skips:
                out[index] = self(state, flat[index])
        return out.view(*x.shape[:-1], self.out_features)

    def nbytes(self, state: int) -> int:
        """Bytes of weights one product in `state` reads (bench's bandwidth accounting)."""
        handler = spec(state).handler
        return 0 if handler is None else self.handler_nbytes(handler)

    def handler_nbytes(self, handler: Handler) -> int:
        form, bias = self.form(handler), self.bias
        return handler.nbytes(form) + (0 if bias is None else bias.numel() * bias.element_size())

    def extra_bytes(self) -> int:
        """Memory held beyond the model's own weights: every form and kernel layout made so far."""
        own = {_address(w) for w in self.weights}
        seen: set[int] = set()
        total = 0
        for value in [*self.forms.values(), *self.prepared.values()]:
            for t in _tensors(value):
                if _address(t) not in own and _address(t) not in seen:
                    seen.add(_address(t))
                    total += t.numel() * t.element_size()
        return total


def _address(t: torch.Tensor) -> int:
    """Where a tensor's data lives; oneDNN's reordered weights have no storage to point at, only themselves."""
    return id(t) if t.is_mkldnn else t.data_ptr()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in _tensors(getattr(value, name))]
    return []


class _Timer:
    """Times candidate kernels on random data of the shape being chosen for; the data lives only while the choice
    is measured (the timer is dropped after `CHOICE.pick`)."""

    def __init__(self, handler: Handler, out_features: int, in_features: int, rows: int) -> None:
        self.handler, self.out_features, self.in_features, self.rows = handler, out_features, in_features, rows
        self.data: tuple[Any, torch.Tensor] | None = None
        self.prepared: dict[str, Any] = {}

    def __call__(self, kernel: str) -> float:
        if self.data is None:
            gen = torch.Generator().manual_seed(0)
            weight = torch.randn(self.out_features, self.in_features, generator=gen) * 0.02
            x = torch.randn(K.row_bucket(self.rows), self.in_features, generator=gen)
            self.data = self.handler.quantize([weight]), x
        form, x = self.data
        if kernel not in self.prepared:
            self.prepared[kernel] = self.handler.prepare(kernel, form)
        prepared = self.prepared[kernel]
        return K.time_call(lambda: self.handler.run(kernel, prepared, x, self.out_features))
