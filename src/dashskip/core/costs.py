"""Relative cost of each execution state (full = 1), so compute ratios mean something on this machine.

A compute ratio is L / sum_i c(s_i) over a token's path. The costs come from timing each layer in each state on
this machine (`measure/profiling.py`); before a profile exists the registry's approximations are used and
labelled as such (`measured` is False).

A compute ratio is not a speed: a decode step also embeds, norms, runs the LM head and samples (SmolLM2's fp32
head reads as many bytes as eight of its layers), and a learned policy spends time deciding. Both are measured as
decode runs them (`outside` per head precision, `decisions` per kind of decider, in full layers), so that a
speedup asked for is a wall-clock one: `speedup` predicts decode wall clock against the full path with the same
head, and `compute_target` is the compute ratio that delivers a requested speedup. A table without them (not
measured, or measured before they were) treats a speedup as a compute ratio.
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
    outside: dict[str, float] = field(default_factory=dict)  # head precision -> a decode token's cost beyond layers
    decisions: dict[str, float] = field(default_factory=dict)  # decider kind -> a decode token's decisions' cost

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

    def wall_clock(self, head: str, decisions: str | None) -> bool:
        """Whether this table knows what a decode token costs beyond its layers with this head and decider."""
        return head in self.outside and (decisions is None or decisions in self.decisions)

    def _beyond(self, head: str, decisions: str | None) -> tuple[float, float]:
        """(a token's cost outside the layers, its decisions' cost), 0 where not measured."""
        if not self.wall_clock(head, decisions):
            return 0.0, 0.0
        return self.outside[head], 0.0 if decisions is None else self.decisions[decisions]

    def speedup(self, states: torch.Tensor, head: str = "full", decisions: str | None = None) -> float:
        """Decode wall clock of the full path (same head) over that of `states` (..., L), as this table predicts
        it; the compute ratio where the table does not know the cost beyond the layers."""
        return self.speedup_at(self.compute_ratio(states), states.shape[-1], head, decisions)

    def speedup_at(self, ratio: float, layers: int, head: str = "full", decisions: str | None = None) -> float:
        """The decode speedup (as `speedup` predicts it) of paths at compute ratio `ratio`."""
        outside, deciding = self._beyond(head, decisions)
        return (layers + outside) / (layers / ratio + outside + deciding)

    def compute_target(self, speedup: float, layers: int, head: str = "full", decisions: str | None = None) -> float:
        """The compute ratio at which decode runs `speedup` times as fast as the full path (same head)."""
        outside, deciding = self._beyond(head, decisions)
        budget = (layers + outside) / speedup - outside - deciding  # what the layers may cost per token
        if budget <= 0:
            most = (layers + outside) / (outside + deciding)
            raise DashskipError(
                f"speedup {speedup} is out of reach on this machine: with the {head} head, even skipping every layer "
                f"would decode at most {most:.2f}x as fast (`dashskip profile` shows the costs); ask for less"
            )
        return layers / budget

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
                outside={k: float(v) for k, v in data.get("outside", {}).items()},
                decisions={k: float(v) for k, v in data.get("decisions", {}).items()},
            )
        except (OSError, ValueError, KeyError) as exc:
            raise DashskipError(f"cannot read cost table '{path}': {exc}; re-run `dashskip profile`") from exc
        if fingerprint and table.fingerprint and table.fingerprint != fingerprint:
            raise DashskipError(
                f"cost table '{path}' was measured on another model (fingerprint {table.fingerprint}, "
                f"this model {fingerprint}); re-run `dashskip profile --model ...`"
            )
        return table
