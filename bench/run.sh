#!/bin/bash
# `make bench`: every benchmark, written to bench/results.md and printed. Needs root, the
# release and static builds (the Makefile's bench target makes them).
#   BENCH_RUNS (default 5)   runs per measurement (medians, min–max shown)
#   BENCH_MB   (default 1024) image size for the staging benchmark
#   BENCH_SMOKE=1            one short iteration of each (CI), results not kept
# One benchmark alone: bench/stage.sh MB RUNS, bench/pull.sh MB RUNS, bench/delta.sh RUNS,
# bench/build.sh RUNS, or
# target/debug/keel-vm-bench RUNS [boot|initramfs|roundtrip|exec|verity|microvm].
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${BENCH_RUNS:-5}
MB=${BENCH_MB:-1024}
OUT=bench/results.md
if [ "${BENCH_SMOKE:-}" = 1 ]; then RUNS=1; MB=64; OUT=$(mktemp); fi
ST=target/x86_64-unknown-linux-gnu/release
size() { stat -c %s "$1"; }
{
  echo "# keel benchmarks"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores, kernel $(uname -r); every ratio is against a baseline measured in the same run."
  echo
  echo "## Binary sizes (static glibc, release, opt-level z, LTO, stripped; initstage also with std rebuilt for size, see the README)"
  echo
  echo "| binary | bytes | goal |"
  echo "|---|---|---|"
  echo "| initstage | $(size $ST/initstage) | ≤ 1,500,000 |"
  echo "| keel-agent | $(size $ST/keel-agent) | ≤ 4,000,000 |"
  echo "| keelctl | $(size $ST/keelctl) | |"
  echo
  echo "## Staging throughput and agent memory"
  echo
  bench/stage.sh "$MB" "$RUNS"
  echo
  if [ "${BENCH_SMOKE:-}" != 1 ]; then
    echo "Peak RSS for a 64 MiB image, same procedure:"
    echo
    bench/stage.sh 64 "$RUNS" | tail -1
    echo
  fi
  echo "## Pull from a web server"
  echo
  bench/pull.sh "$MB" "$RUNS"
  echo
  if [ "${BENCH_SMOKE:-}" != 1 ]; then
    echo "The same for a 64 MiB image (peak RSS against image size):"
    echo
    bench/pull.sh 64 "$RUNS" | grep 'RSS'
    echo
  fi
  echo "## Delta updates"
  echo
  bench/delta.sh "$RUNS"
  echo
  echo "## Build from a container image"
  echo
  bench/build.sh "$RUNS"
  echo
  echo "## In QEMU"
  echo
  target/debug/keel-vm-bench "$RUNS"
} | tee "$OUT"
[ "${BENCH_SMOKE:-}" = 1 ] && rm -f "$OUT"
echo "(written to $OUT)"
