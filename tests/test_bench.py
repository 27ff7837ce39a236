"""The benchmark scripts that cannot run here in full still run: bench/gpu_extract.py is prepared
for a lent GPU machine (minutes of device time, all tries together), so its CPU smoke run must
pass before any of that time is spent. And `python bench/X.py --help` explains every flag."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_help import help_problems

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_gpu_benchmark_runs_every_stage_in_its_cpu_smoke(tmp_path, backend):
    """On JAX (the GPU machine's backend, .ci/run's JAX leg) the JAX-only stage runs too: the
    bfloat16 conv+pool check (an XLA:CPU bug seen with some jax versions) in a child process."""
    pytest.importorskip(backend, reason=f"the CPU smoke run on the {backend} backend needs {backend}")
    out = tmp_path / "gpu_extract.json"
    env = {**os.environ, "KERAS_BACKEND": backend, "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_extract.py"), "--quick", "--cpu-smoke",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["skipped"] == [], r["skipped"]
    for stage, rows in (("decode_only", 2), ("trunk", 2), ("e2e", 4), ("predict", 2), ("accuracy", 1)):
        assert len(r[stage]) == rows, (stage, r[stage])
    assert all(row["rows_ok"] for row in r["e2e"]), r["e2e"]
    assert r["blog"]["img_s"] > 0
    if backend == "jax":
        check = r["bf16_conv_pool_jit_check"]
        assert "error" not in check and check["eager_finite"], check  # jit_finite is what it records


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_every_bench_flag_has_help_text(path):
    """`python bench/X.py --help` explains every flag (value, unit, default) and the script itself;
    read with ast, since importing a benchmark pulls in TensorFlow, faiss or Ray."""
    problems = help_problems(path, ROOT)
    assert not problems, "\n".join(problems)
