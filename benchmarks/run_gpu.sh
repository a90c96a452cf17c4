#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with a CUDA device:
#   benchmarks/run_gpu.sh OUT_DIR
# `pytest -m gpu` (flash kernel in every attention scope, DiT-XL/2 at 64k tokens) and the bench_gpu* scripts,
# each under a time limit so one that hangs cannot take the others' figures with it. Wheels in .whl/ (diffusers
# for the prepare stage's VAE, where the machine lacks it) are installed to a private folder first.
# Figures land in OUT_DIR as JSON (ARCHIVE=PATH also packs OUT_DIR into one .tgz after each check; CHECKS="tests
# gpu" runs a subset); benchmarks/RESULTS.md records them with the device and date.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
$py -c 'import torch; print("torch", torch.__version__)' | tee -a "$out/device.txt"
step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT_DIR/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s"
  tail -n 4 "$out/$name.log"
  if [ -n "${ARCHIVE:-}" ]; then  # one file with every figure so far (a run cut short keeps what it measured)
    tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")"
  fi
}
for check in ${CHECKS:-tests serve vae prepare wan gpu}; do
  case $check in
    tests) SORA_GPU_FIGURES=$out/gpu_tests.json step tests 240 $py -m pytest -m gpu tests/gpu -q -p no:cacheprovider ;;
    gpu) step bench_gpu 300 $py -m benchmarks.bench_gpu --quick --json "$out/bench_gpu.json" ;;
    serve) step bench_gpu_serve 180 $py -m benchmarks.bench_gpu_serve --quick --json "$out/bench_gpu_serve.json" ;;
    prepare) step bench_gpu_prepare 180 $py -m benchmarks.bench_gpu_prepare --quick --json "$out/bench_gpu_prepare.json" ;;
    vae) step bench_gpu_vae 180 $py -m benchmarks.bench_gpu_vae --json "$out/bench_gpu_vae.json" ;;
    wan) step bench_gpu_wan 180 $py -m benchmarks.bench_gpu_wan --quick --json "$out/bench_gpu_wan.json" ;;
  esac
done
