"""Every Triton kernel compiles for real GPUs (A100 sm_80, H100/H200 sm_90) on a machine without one.

The interpreter tests check what the kernels compute; this checks that the GPU compiler accepts them (INT8 MMA shapes,
layouts, shared memory per autotune config). It runs tests/kernels/aot_compile_check.py in a subprocess because the
kernels must be JIT functions there, not the interpreted ones this session imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile_check.py")
REPO = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's NVIDIA backend with its bundled ptxas")


def _run(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, stated to silence Triton 3.9's notice
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *flags],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["failures"], "\n".join(report["failures"])[:6000]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return report


def test_kernels_compile_for_sm90(tmp_path):
    # Every launch of every kernel (each flag combination the drivers use), its first autotune config, for H100/H200.
    report = _run(tmp_path, "--arch", "90", "--quick")
    kernels = {entry["kernel"].split("[")[0] for entry in report["compiled"]}
    assert len(kernels) == 8, kernels


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ZQHERO_AOT_ALL_CONFIGS") != "1",
                    reason="about 2 minutes cold; set ZQHERO_AOT_ALL_CONFIGS=1 (CI, or after changing a kernel)")
def test_every_autotune_config_compiles_for_sm80_and_sm90(tmp_path):
    # Adds A100 and every config of the tuning lists (shared memory checked per architecture).
    report = _run(tmp_path, "--arch", "80", "90", "--all-configs")
    assert len(report["compiled"]) > 60
