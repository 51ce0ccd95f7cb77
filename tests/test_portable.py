"""The paths most users' CPUs take, run on this host: the engine's tests with dashskip's compiled kernels hidden
(`DASHSKIP_SMALL_GEMM=0`: ARM, or where the extension cannot build: torch's ops for every product, norm, rope,
attention and the policy's decision) and with only the AVX2 kernels (`DASHSKIP_ISA=avx2`: no AVX-512, no VNNI).

Each switch is a process setting (the kernels are chosen once per process), so each runs the engine's test
modules in a process of its own: the full path against transformers' logits and greedy tokens for every family,
every state against its reference, the K/V cache, lossless decoding, the policy's decisions and rate control.
`tests/conftest.py` checks in that process that the switch really hides what it names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_engine.py", "tests/test_layers.py", "tests/test_lossless.py", "tests/test_policy.py"]


@pytest.mark.parametrize(
    "switch, modules",
    [
        ({"DASHSKIP_SMALL_GEMM": "0"}, MODULES),
        ({"DASHSKIP_ISA": "avx2"}, [*MODULES, "tests/test_kernels.py"]),
    ],
    ids=["no-extension", "avx2-only"],
)
def test_the_engines_tests_pass_on_the_portable_paths(switch, modules):
    env = {**os.environ, **switch}
    marks = "addopts=-m 'not slow and not real'"  # the real models' tests run once, in the main run
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-o", marks, *modules],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert out.returncode == 0, f"{switch}: {summary}\n{out.stdout[-4000:]}"
    assert " passed" in summary and " failed" not in summary
