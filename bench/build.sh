#!/bin/bash
# `keelctl build --from docker://…` against its baseline, `skopeo copy` + `umoci unpack` +
# `mksquashfs` of the same image from the same registry (Debian's docker-registry on
# 127.0.0.1): wall time, and peak RSS. The image is a Debian 12 minbase (debootstrap, cached
# under target/bench-build) split by umoci into four gzip layers: the base system without
# /usr/share and /var; /usr/share; /var; a layer that deletes the docs and man pages (whiteouts)
# and changes /etc. keel's RSS is its own process's (VmHWM, read every 20 ms); mksquashfs,
# which both run, is measured on its own. A smaller image (the first layer alone) shows
# whether keel's RSS grows with the image.
#
#   bench/build.sh [RUNS]      (needs root, debootstrap, umoci, skopeo, docker-registry)
set -euo pipefail
RUNS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KEELCTL=${KEEL_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/release}/keelctl
W=$(mktemp -d /var/tmp/keel-build-bench.XXXXXX)
REG=
cleanup() {
  [ -n "$REG" ] && kill "$REG" 2>/dev/null && wait "$REG" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

# The Debian root, once.
. "$ROOT/bench/debroot.sh"

# Four layers, by umoci (gzip).
cd "$W"
umoci init --layout img
umoci new --image img:t
umoci unpack --image img:t bundle > /dev/null
R=bundle/rootfs
tar -C "$D" --exclude=./usr/share --exclude=./var --exclude=./.complete -cf - . | tar -C "$R" -xf -
umoci repack --refresh-bundle --image img:t bundle
umoci tag --image img:t s
tar -C "$D" -cf - ./usr/share | tar -C "$R" -xf -
umoci repack --refresh-bundle --image img:t bundle
tar -C "$D" -cf - ./var | tar -C "$R" -xf -
umoci repack --refresh-bundle --image img:t bundle
rm -rf "$R/usr/share/doc" "$R/usr/share/man"
echo keel-bench > "$R/etc/hostname"
umoci repack --refresh-bundle --image img:t bundle
rm -rf bundle
TREE_MB=$(du -sm --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./.complete "$D" | cut -f1)
BLOB_MB=$(du -sm img/blobs | cut -f1)

# A port nothing listens on.
PORT=
for _ in $(seq 100); do
  p=$((20000 + RANDOM % 20000))
  (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { PORT=$p; break; }
done
[ -n "$PORT" ] || { echo "bench/build.sh: no free port on 127.0.0.1 in 100 tries" >&2; exit 1; }
mkdir -p reg
cat > reg/config.yml <<CONF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $W/reg/data
http:
  addr: 127.0.0.1:$PORT
CONF
docker-registry serve reg/config.yml > reg/log 2>&1 &
REG=$!
for _ in $(seq 200); do
  (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
  sleep 0.05
done
for tag in t s; do
  skopeo copy -q --dest-tls-verify=false oci:img:$tag docker://127.0.0.1:$PORT/bench/deb:$tag
done
rm -rf img

now() { date +%s.%N; }
# Runs "$@" in the background; prints its wall seconds and peak RSS (KiB, VmHWM).
timed_hwm() {
  local t0 pid hwm=0 v
  t0=$(now)
  "$@" > "$W/out" 2> "$W/err" & pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    v=$(awk '/^VmHWM/{print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$v" ] && hwm=$v
    sleep 0.02
  done
  wait "$pid" || { cat "$W/err" >&2; return 1; }
  [ -z "${KEEL_BENCH_VERBOSE:-}" ] || cat "$W/err" "$W/out" >&2
  echo "$(echo "$(now) - $t0" | bc) $hwm"
}
keel() {
  rm -f "$W/keel.squashfs"
  timed_hwm "$KEELCTL" build --from "docker://127.0.0.1:$PORT/bench/deb:$1" --insecure -o "$W/keel.squashfs"
}
# Prints: total seconds, skopeo, umoci, mksquashfs seconds, umoci's and mksquashfs's peak RSS.
baseline() {
  rm -rf "$W/base-oci" "$W/base-bundle" "$W/base.squashfs"
  local t0 t1 t2 rss_umoci rss_sq
  t0=$(now)
  skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$PORT/bench/deb:$1" "oci:$W/base-oci:$1"
  t1=$(now)
  rss_umoci=$( { /usr/bin/time -f %M umoci unpack --image "$W/base-oci:$1" "$W/base-bundle" > /dev/null; } 2>&1 | tail -1)
  t2=$(now)
  rss_sq=$( { /usr/bin/time -f %M mksquashfs "$W/base-bundle/rootfs" "$W/base.squashfs" -noappend -no-progress -quiet -mkfs-time 0 > /dev/null; } 2>&1 | tail -1)
  local t3; t3=$(now)
  echo "$(echo "$t3 - $t0" | bc) $(echo "$t1 - $t0" | bc) $(echo "$t2 - $t1" | bc) $(echo "$t3 - $t2" | bc) $rss_umoci $rss_sq"
}
# keel's packing (mksquashfs) seconds, from its last output line.
keel_pack() { sed -n 's/.*packing \([0-9]*\) ms.*/\1/p' "$W/out" | awk '{print $1 / 1000}'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }

: > keel.t; : > keel.pack; : > base.t; : > skopeo.t; : > umoci.t; : > sq.t; : > keel.rss; : > umoci.rss; : > sq.rss
# One of each first, not counted: the first writes after the setup run slow (not in CI's smoke run).
[ "${BENCH_SMOKE:-}" = 1 ] || { keel t > /dev/null; baseline t > /dev/null; }
for _ in $(seq "$RUNS"); do
  # They take turns, so that a slow spell of the host hits both. Results go through files,
  # not `< <(…)`, so that a failed build stops the script (set -e).
  sync
  keel t > run.k; read -r t rss < run.k; echo "$t" >> keel.t; echo "$rss" >> keel.rss; keel_pack >> keel.pack
  sync
  baseline t > run.b; read -r t ts tu tq ru rs < run.b
  echo "$t" >> base.t; echo "$ts" >> skopeo.t; echo "$tu" >> umoci.t; echo "$tq" >> sq.t
  echo "$ru" >> umoci.rss; echo "$rs" >> sq.rss
done
keel s > run.k; read -r _ small_rss < run.k
rm -rf "$W/base-oci" "$W/base-bundle"

KT=$(median < keel.t); BT=$(median < base.t); KP=$(median < keel.pack)
KR=$(median < keel.rss); UR=$(median < umoci.rss); SR=$(median < sq.rss)
mib() { echo "scale=1; $1 / 1024" | bc; }
sec() { printf '%.2f s (%s)' "$(median < "$1")" "$(range < "$1")"; }
ratio() { echo "scale=2; $1 / $2" | bc | sed 's/^\./0./'; }
echo "A Debian 12 minbase, $TREE_MB MiB unpacked, in 4 gzip layers ($BLOB_MB MiB of blobs), from docker-registry on 127.0.0.1; median of $RUNS, min–max:"
echo
echo "| build | time | of which mksquashfs | peak RSS |"
echo "|---|---|---|---|"
echo "| keelctl build --from docker://… (squashfs) | $(sec keel.t) | $(sec keel.pack) | keelctl $(mib "$KR") MiB (the first layer alone: $(mib "$small_rss") MiB) |"
echo "| skopeo copy ($(sec skopeo.t)) + umoci unpack ($(sec umoci.t)) + mksquashfs | $(sec base.t) | $(sec sq.t) | umoci unpack $(mib "$UR") MiB; mksquashfs $(mib "$SR") MiB |"
echo
echo "- keelctl build takes **$(ratio "$KT" "$BT")×** the baseline's time (goal ≤ 0.7×). mksquashfs, which both run with the same options, is $(ratio "$KP" "$KT") of keel's time; keel's own part (fetch, check, apply) is $(ratio "$(echo "$KT - $KP" | bc)" "$(echo "$BT - $(median < sq.t)" | bc)")× skopeo copy + umoci unpack."
echo "- keelctl's own peak RSS: $(mib "$KR") MiB (goal ≤ 64 MiB), $(mib "$small_rss") MiB for the first layer alone: it does not grow with the image. (mksquashfs's is its own and the same in both.)"
