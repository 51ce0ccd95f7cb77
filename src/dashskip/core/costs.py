"""Relative cost of each execution state (full = 1), so compute ratios mean something on this machine.

A compute ratio is L / sum_i c(s_i) over a token's path. The costs come from timing each layer in each state on
this machine (`measure/profiling.py`); before a profile exists the registry's approximations are used and
labelled as such (`measured` is False).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dashskip.core.files import atomic_write_text
from dashskip.core.states import code_lookup, registered, spec
from dashskip.errors import DashskipError


@dataclass
class CostTable:
    """Relative cost of each state (full = 1), for decode and prefill, plus the raw per-layer timings."""

    decode: dict[int, float]
    prefill: dict[int, float]
    measured: bool = False
    fingerprint: str = ""
    machine: str = ""
    layer_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # from state_errors(), per layer

    @classmethod
    def default(cls) -> CostTable:
        """Each registered state's approximate cost (METHOD.md's), used until `dashskip profile` measured this
        machine."""
        approx = {s.code: s.default_cost for s in registered()}
        return cls(decode=dict(approx), prefill=dict(approx))

    def provenance(self) -> dict[str, object]:
        """Where the numbers come from: measured or approximate, on which host, and whether that is this one."""
        from dashskip.core.kernels import host_description

        return {"measured": self.measured, "machine": self.machine or None,
                "this_machine": bool(self.measured and self.machine == host_description())}  # fmt: skip

    def cost(self, state: int, mode: str = "decode") -> float:
        table = self.decode if mode == "decode" else self.prefill
        if state not in table:
            raise DashskipError(
                f"the cost table has no entry for state {spec(state).name}; re-run `dashskip profile`"
            )
        return table[state]

    def compute_ratio(self, states: torch.Tensor, mode: str = "decode") -> float:
        """L / mean executed cost per token, for states of shape (..., L)."""
        per_token = self.token_costs(states, mode)
        return float(states.shape[-1] / per_token.float().mean().clamp(min=1e-9))

    def token_costs(self, states: torch.Tensor, mode: str = "decode") -> torch.Tensor:
        """Executed cost of each token's path (in full layers), for states of shape (..., L)."""
        table = self.decode if mode == "decode" else self.prefill
        return code_lookup(table)[states.long()].sum(-1)

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data["decode"] = {str(k): v for k, v in self.decode.items()}
        data["prefill"] = {str(k): v for k, v in self.prefill.items()}
        atomic_write_text(Path(path), json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> CostTable:
        try:
            data = json.loads(Path(path).read_text())
            table = cls(
                decode={int(k): float(v) for k, v in data["decode"].items()},
                prefill={int(k): float(v) for k, v in data["prefill"].items()},
                measured=bool(data.get("measured")),
                fingerprint=data.get("fingerprint", ""),
                machine=data.get("machine", ""),
                layer_ms=data.get("layer_ms", {}),
                errors=data.get("errors", {}),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise DashskipError(f"cannot read cost table '{path}': {exc}; re-run `dashskip profile`") from exc
        if fingerprint and table.fingerprint and table.fingerprint != fingerprint:
            raise DashskipError(
                f"cost table '{path}' was measured on another model (fingerprint {table.fingerprint}, "
                f"this model {fingerprint}); re-run `dashskip profile --model ...`"
            )
        return table
