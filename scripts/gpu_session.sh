#!/usr/bin/env bash
# The GPU work of a session that is lent a GPU, in few calls of the device tool (which runs a command in
# the repository root of a copy of the working tree, and sends back what the command writes to $OUT):
#
#   bash scripts/gpu_session.sh tests                  # install, then the GPU tests (pytest -m gpu)
#   bash scripts/gpu_session.sh bench crops topk ...   # install, then these benchmarks on CUDA (none
#                                                      # named: all of them; a call may take 10 minutes)
#
# Each benchmark's JSON goes to $OUT (bench/results where OUT is not set): copy it to bench/results and
# commit it. Everything the steps print goes to $OUT/gpu-<stage>.log; stdout gets a line per step and
# the log's end. The GPU image has torch, Triton and CuPy and no network, so only the package itself
# is installed, built there (a later call on the same machine finds it built), with `python -m pip`: the
# image's bare `pip` belongs to another Python, without torch or pybind11. NX_DEVICE (default
# cuda) and NX_BENCH_ARGS (e.g. --quick) change what the benchmarks get:
# NX_DEVICE=cpu NX_BENCH_ARGS=--quick OUT=/tmp/x bash scripts/gpu_session.sh bench tries the steps
# on a machine without a GPU.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
stage=${1:-}
[ $# -gt 0 ] && shift
case "$stage" in
  tests | bench) ;;
  *)
    echo "usage: bash scripts/gpu_session.sh tests | bench [NAME ...]   (NAME: topk crops ablation index ops color maximize)" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
log="$out/gpu-$stage.log"
: >"$log"

if ! python -c "import neuroidx_fast._C" >>"$log" 2>&1; then
  echo "installing the package (python -m pip install --no-build-isolation --no-deps -e .)"
  if ! python -m pip install --no-build-isolation --no-deps -e . >>"$log" 2>&1; then
    echo "the install failed; the end of $log:"
    tail -20 "$log"
    exit 1
  fi
fi

if [ "$stage" = tests ]; then
  python -m pytest -m gpu -q -ra -p no:cacheprovider >>"$log" 2>&1
  status=$?
  echo "GPU tests (exit $status): $(tail -1 "$log")"
  grep -E "^(FAILED|ERROR)" "$log" | head -20
  exit $status
fi

[ $# -gt 0 ] || set -- topk crops ablation index ops color maximize
status=0
for name in "$@"; do
  if [ ! -f "bench/bench_$name.py" ]; then
    echo "bench_$name: no such benchmark (bench/bench_$name.py)"
    status=1
    continue
  fi
  start=$SECONDS
  echo "=== bench_$name" >>"$log"
  # shellcheck disable=SC2086  # NX_BENCH_ARGS is a list of options
  python -m "bench.bench_$name" --device "${NX_DEVICE:-cuda}" --out "$out" ${NX_BENCH_ARGS:-} >>"$log" 2>&1
  code=$?
  [ $code -eq 0 ] || status=1
  echo "bench_$name: exit $code after $((SECONDS - start)) s"
done
echo "--- the end of $log:"
tail -40 "$log"
exit $status
