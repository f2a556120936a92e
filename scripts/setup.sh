#!/usr/bin/env bash
# Set up a virtual environment for distrib in ./.venv (idempotent).
#
# torch goes in first, pinned, so that pip never resolves a multi-GB CUDA build on a CPU machine.
# On a CUDA cluster set TORCH_SPEC to the build that matches the drivers, for example
#   TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<your CUDA wheel index> bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[test]"

# DeepSpeed JIT-compiles its CPU ops (the shared-memory collective, fused Adam, and the CPU Adam
# used with optimizer offload) the first time a run needs them: minutes on 2 cores, then cached in
# ~/.cache/torch_extensions. Build them once here, in one process, instead of inside a training run.
python - <<'PY'
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
PY
echo "distrib: environment ready in .venv"
