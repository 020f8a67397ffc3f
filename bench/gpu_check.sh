#!/usr/bin/env bash
# What a GPU should check, most important first. Each step has its own time limit, so a slow step cannot
# use up the device time the others need. Logs and JSON go to $OUT (default: ./gpu-check).
#
#   pip install -e ".[test]"        # or, where no registry can be reached: pip install --no-deps --no-build-isolation -e .
#   bash bench/gpu_check.sh         # PARITY_S=240 BENCH_S=420 PYTHON=python3 by default
#
# 1. The parity tests on the GPU (tests/test_parity.py, tests/test_naflex.py): float32 against transformers,
#    stopping at the first failure with its whole traceback (parity.txt).
# 2. bench/gpu.py at batch 128: the towers' GEMMs, `embed` end to end, bf16 towers against transformers
#    (ours, ours with cuDNN attention, sdpa, torch.compile), float32 (gpu.txt, gpu.json).
set -u
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-gpu-check}")
python=$(realpath -s -m "$(command -v "${PYTHON:-python3}")")   # absolute, the venv kept: the steps cd
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  "$python" -c "import jax, flax, orbax.checkpoint as o, torch, transformers as t; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'orbax', o.__version__, 'torch', torch.__version__, 'transformers', t.__version__)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

(cd tests && timeout "${PARITY_S:-240}" "$python" -m pytest -x -q --tb=long -p no:cacheprovider test_parity.py test_naflex.py) \
    > "$out/parity.txt" 2>&1
echo "parity: exit $? (124: out of time)"; grep -E "^E |passed|failed|error" "$out/parity.txt" | tail -20

(cd bench && timeout "${BENCH_S:-420}" "$python" gpu.py --batch 128 --json "$out/gpu.json") 2>&1 \
    | grep --line-buffered -v "Loading weights\|Writing model\|token_id must" | tee "$out/gpu.txt"
