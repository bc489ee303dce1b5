"""One measurement per x86 instruction set, each in a process of its own (oneDNN and ATen read their ISA limits
once, at start): native, and AVX2 emulated with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2. A child prints
one line `RESULT <json>`; the parent reads it back (standard library only, so the parent loads no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ISAS = {"AVX512 (native)": {}, "AVX2 (emulated)": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
ISA_TAGS = {"AVX512 (native)": "avx512", "AVX2 (emulated)": "avx2"}


def report(result: dict) -> None:
    """In the child: hand `result` to the parent."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(argv: list[str], env: dict[str, str]) -> tuple[dict | None, int, str]:
    """(result, exit code, why) of `python argv` with `env` added; result None when the child failed, why its last
    line of stderr."""
    proc = subprocess.run([sys.executable, *argv], env={**os.environ, **env}, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return None, proc.returncode, (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return json.loads(lines[-1][len("RESULT "):]), 0, ""
