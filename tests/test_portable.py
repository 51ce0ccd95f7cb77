"""The paths most users' CPUs take, run on this host: the engine's tests with dashskip's compiled kernels hidden
(`DASHSKIP_SMALL_GEMM=0`: ARM, or where the extension cannot build: torch's ops for every product, norm, rope,
attention and the policy's decision) and with only the AVX2 kernels (`DASHSKIP_ISA=avx2`: no AVX-512, no VNNI).

Each switch is a process setting (the kernels are chosen once per process), so each runs the engine's test
modules in a process of its own: the full path against transformers' logits and greedy tokens for every family,
every state against its reference, the K/V cache, lossless decoding, the policy's decisions and rate control.
`tests/conftest.py` checks in that process that the switch really hides what it names.

The two processes run side by side, one thread each: their tiny models' steps are mostly Python, so on two cores
the pair takes half the time of two two-threaded runs in turn (50 against 104 s on a 2-core Intel Xeon host).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_engine.py", "tests/test_layers.py", "tests/test_lossless.py", "tests/test_policy.py"]
# One thread each: how the kernels split work between threads is the same code on every ISA, and the main run
# tests it with the host's threads; here what differs is which inner loops run.
SWITCHES = {
    "no-extension": ({"DASHSKIP_SMALL_GEMM": "0", "OMP_NUM_THREADS": "1"}, MODULES),
    "avx2-only": ({"DASHSKIP_ISA": "avx2", "OMP_NUM_THREADS": "1"}, [*MODULES, "tests/test_kernels.py"]),
}


def test_the_engines_tests_pass_on_the_portable_paths(tmp_path):
    marks = "addopts=-m 'not slow and not real'"  # the real models' tests run once, in the main run
    runs = {}
    for name, (switch, modules) in SWITCHES.items():
        env = {**os.environ, **switch}
        log = (tmp_path / f"{name}.log").open("w")
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider", "-o",
                   marks, *modules]  # fmt: skip
        runs[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    failed = []
    for name, (proc, log) in runs.items():
        proc.wait(timeout=1200)
        log.close()
        output = (tmp_path / f"{name}.log").read_text()
        summary = output.strip().splitlines()[-1] if output.strip() else "(no output)"
        if proc.returncode != 0 or " passed" not in summary or " failed" in summary:
            failed.append(f"{name} ({SWITCHES[name][0]}): {summary}\n{output[-4000:]}")
    assert not failed, "\n\n".join(failed)
