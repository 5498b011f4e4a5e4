#!/usr/bin/env bash
# The paper's configuration at GPU speed, on a GPU machine with torch (CUDA) and no network.
#
#   bash benchmarks/gpu_wheels.sh          # first, here (with PyPI): fills wheels/gpu/ (git-ignored)
#   bash benchmarks/gpu_check.sh           # there, with wheels/gpu carried along; under 8 minutes
#
# Installs the carried wheels with pip, offline (--no-index --find-links wheels/gpu): transformers, opacus,
# peft, huggingface_hub, tokenizers, safetensors (and bitsandbytes when it was carried) at the versions
# tested here; pip keeps whatever the machine already has that satisfies them, torch above all (a
# fallback installs with --no-deps, never touching torch). Then dpnb itself (--no-deps, editable, or
# PYTHONPATH), then benchmarks/gpu_check.py under a hard timeout. Everything it prints also goes to
# $OUT/gpu_check.txt when $OUT is set, and its JSON to $OUT/gpu_check.json.
# Settings: PYTHON (default python3), GPU_CHECK_SECONDS (the whole script's budget, default 470).
set -uo pipefail
cd "$(dirname "$0")/.."
STARTED=$(date +%s)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-470}
LOG=/dev/null
JSON=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  LOG=$OUT/gpu_check.txt
  JSON=$OUT/gpu_check.json
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
  echo "gpu_check.sh: $(date -Is) on $(hostname); $("$PY" -V 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available',
torch.cuda.is_available())" || { echo "torch does not import: nothing to check"; exit 2; }

  # --------------------------------------------------------------- the wheels, offline
  if [ ! -f wheels/gpu/requirements.txt ]; then
    echo "no wheels/gpu/requirements.txt: run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable, and"
    echo "carry wheels/gpu here; trying with the packages this machine already has"
  else
    # the top-level packages at their tested versions; pip takes their dependencies from the folder only
    # where the machine lacks them (or has an unsuitable version), and keeps its own torch
    top=$(grep -E '^(transformers|tokenizers|safetensors|huggingface-hub|opacus|peft|bitsandbytes)==' \
          wheels/gpu/requirements.txt | tr '\n' ' ')
    echo "installing from wheels/gpu: $top"
    if ! "$PY" -m pip install -q --no-index --find-links wheels/gpu --no-cache-dir --no-compile \
         --disable-pip-version-check $top; then
      echo "pip could not resolve offline; installing the carried wheels with --no-deps instead (torch untouched):"
      echo "the top-level packages, and each other wheel whose package this machine lacks"
      for wheel in wheels/gpu/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1 | tr '_' '-' | tr '[:upper:]' '[:lower:]')
        if echo " $top" | grep -qiE " ${name}=="; then
          "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --no-compile "$wheel"
        elif ! "$PY" -m pip show -q "$name" >/dev/null 2>&1; then
          "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --no-compile "$wheel"
        fi
      done
    fi
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . \
    >/dev/null 2>&1 || echo "(dpnb not pip-installed; importing it from the working tree)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "
import importlib.metadata as m
names = ['torch', 'transformers', 'opacus', 'peft', 'huggingface_hub', 'tokenizers', 'numpy', 'scipy', 'bitsandbytes']
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return 'missing'
print('versions: ' + ', '.join(f'{n} {version(n)}' for n in names))"

  # --------------------------------------------------------------- the check, under a hard timeout
  spent=$(( $(date +%s) - STARTED ))
  left=$(( BUDGET - spent ))
  echo "install took ${spent} s; gpu_check.py gets ${left} s (it plans for $((left - 60)) s)"
  timeout -k 10 "$left" "$PY" benchmarks/gpu_check.py --json --budget $((left - 60))
  status=$?
  [ $status -eq 124 ] && echo "gpu_check.py ran past its ${left} s and was stopped"
  echo "gpu_check.sh: exit $status after $(( $(date +%s) - STARTED )) s"
  exit $status
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
# the JSON object gpu_check.py printed last, on its own
if [ "$LOG" != /dev/null ]; then
  grep '^{"date"' "$LOG" | tail -1 > "$JSON" || true
fi
exit "$status"
