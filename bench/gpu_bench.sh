#!/usr/bin/env bash
# GPU benchmark on a device machine (no network there): bench/gpu_bench.py with the project's pins.
#
# The device image has its own torch/torchvision (fine) but transformers 5.x; the project pins
# transformers 4.57.3 (model-contract.md), so carry these wheels (pure Python / abi3, ~15 MB):
#   here, once:   bash bench/gpu_bench.sh --fetch-wheels      (pip download into .whl/, git-ignored)
#   device tool:  run(command="bash bench/gpu_bench.sh", carry=[".whl"], timeout_s=330)
# (fetch in the checkout the device tool sends: its .whl/ is what `carry` names.)
# Output: the tables on stdout, and $OUT/gpu_bench.json + $OUT/gpu_bench.log when $OUT is set.
# Extra arguments go to gpu_bench.py (e.g. --items 48 --skip-reranker --peak-tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=("transformers==4.57.3" "tokenizers==0.22.2" "huggingface_hub==0.36.2" "qwen-vl-utils==0.0.14")

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    PY=$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit 0
fi

trap 'echo "# gpu_bench.sh: ${SECONDS} s in all (the device tool'"'"'s timeout_s must leave room for a rerun)"' EXIT
missing=()
for wheel in "${WHEELS[@]}"; do
    name=${wheel%%==*}; version=${wheel##*==}
    compgen -G ".whl/${name//-/_}-${version}-*.whl" > /dev/null || missing+=("$wheel")
done
if (( ${#missing[@]} )) && [[ "${QVL_ALLOW_DEVICE_TRANSFORMERS:-}" != 1 ]]; then
    # Without them the device's own transformers 5.x and no qwen-vl-utils: the run would fail at import,
    # minutes of device time later. QVL_ALLOW_DEVICE_TRANSFORMERS=1 runs anyway.
    echo "# gpu_bench.sh: .whl/ lacks ${missing[*]}: run 'bash bench/gpu_bench.sh --fetch-wheels' here and carry .whl" >&2
    exit 1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import torch, transformers; print('# torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

OUT_DIR=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT_DIR"
# Checkpoints are built on the GPU (seconds) under /tmp: the 2B weights never travel.
python3 bench/gpu_bench.py --ckpt-dir /tmp/qvl-gpu-ckpt --out "$OUT_DIR/gpu_bench.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
