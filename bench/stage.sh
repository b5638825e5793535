#!/bin/bash
# Staging throughput and agent memory: push an image over loopback TCP (and the Unix socket)
# into an ext4 newimg on a loop device, against `cat img > file && sync` and
# `sha256sum img && cp img file && sync` into the same filesystem. Everything runs in a
# private mount namespace; the loop device is detached on exit.
#
#   bench/stage.sh [SIZE_MB] [RUNS]      (needs root and release builds of keel-agent, keelctl)
set -euo pipefail
SIZE_MB=${1:-1024}
RUNS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KEEL_BIN:-$ROOT/target/release}
[ "${KEEL_IN_NS:-}" = 1 ] || exec unshare -m --propagation private env KEEL_IN_NS=1 "$0" "$@"

W=$(mktemp -d /var/tmp/keel-bench.XXXXXX)
LOOP=
AGENT=
cleanup() {
  [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
  mountpoint -q "$W/mnt" && umount "$W/mnt"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  rm -rf "$W"
}
trap cleanup EXIT

truncate -s $((SIZE_MB * 2 + 256))M "$W/newimg.ext4"
mkfs.ext4 -q -F -L newimg -E lazy_itable_init=0,lazy_journal_init=0 "$W/newimg.ext4"
LOOP=$(losetup --show -f "$W/newimg.ext4")
mkdir -p "$W/mnt" "$W/etc"
mount "$LOOP" "$W/mnt"
head -c $((SIZE_MB << 20)) /dev/urandom > "$W/img"
cat "$W/img" > /dev/null
"$BIN/keelctl" keygen "$W/etc/key.pem" > /dev/null
"$BIN/keelctl" sign "$W/img" --key "$W/etc/key.pem" --name bench --version 2 > /dev/null
# The same data with a dm-verity tree appended: the agent checks the tree while it stages.
cp "$W/img" "$W/imgv"
"$BIN/keelctl" sign "$W/imgv" --verity --key "$W/etc/key.pem" --name bench --version 2 > /dev/null
cat > "$W/etc/agent.toml" <<TOML
unix = "$W/etc/agent.sock"
tcp = "127.0.0.1:0"
identity = "$W/etc/identity.pem"
trusted_keys = "$W/etc/key.pem.pub"
newimg_dir = "$W/mnt"
img_dir = "$W/etc"
boot_report = "$W/etc/none.json"
name = "bench"
TOML

now() { date +%s.%N; }
clean_slot() { rm -f "$W/mnt"/* 2>/dev/null || true; sync; }
t_cat() { clean_slot; local t=$(now); cat "$W/img" > "$W/mnt/file"; sync; echo "$(now) - $t" | bc; }
t_sha_cp() { clean_slot; local t=$(now); sha256sum "$W/img" > /dev/null; cp "$W/img" "$W/mnt/file"; sync; echo "$(now) - $t" | bc; }
start_agent() {
  "$BIN/keel-agent" --config "$W/etc/agent.toml" 2> "$W/agent.log" &
  AGENT=$!
  for _ in $(seq 100); do grep -q 'tcp://127.0.0.1:' "$W/agent.log" && break; sleep 0.05; done
  TCP=$(grep -o 'tcp://127.0.0.1:[0-9]*' "$W/agent.log" | head -1)
}
# TCP is TLS: the agent's key pinned (nothing is remembered in the user's known_agents).
t_push() { clean_slot; local t=$(now); "$BIN/keelctl" -e "$1" --agent-key "$W/etc/identity.pem.pub" push "${2:-$W/img}" > /dev/null 2>&1; echo "$(now) - $t" | bc; }

start_agent
HWM0=$(awk '/VmHWM/{print $2}' /proc/$AGENT/status)
RSS0=$(awk '/VmRSS/{print $2}' /proc/$AGENT/status)
for _ in $(seq 100); do "$BIN/keelctl" -e "unix://$W/etc/agent.sock" status > /dev/null; done
RSS100=$(awk '/VmRSS/{print $2}' /proc/$AGENT/status)
HWM100=$(awk '/VmHWM/{print $2}' /proc/$AGENT/status)
declare -a CAT SHA TCPT VTCPT UNIXT
for i in $(seq "$RUNS"); do
  CAT+=("$(t_cat)")
  SHA+=("$(t_sha_cp)")
  TCPT+=("$(t_push "$TCP")")
  VTCPT+=("$(t_push "$TCP" "$W/imgv")")
  [ "$(sha256sum < "$W/mnt/root-squashfs.img" | cut -d' ' -f1)" = "$(sha256sum < "$W/imgv" | cut -d' ' -f1)" ] || { echo "verity push: staged bytes differ" >&2; exit 1; }
  UNIXT+=("$(t_push "unix://$W/etc/agent.sock")")
done
HWM=$(awk '/VmHWM/{print $2}' /proc/$AGENT/status)
[ "$(sha256sum < "$W/mnt/root-squashfs.img" | cut -d' ' -f1)" = "$(sha256sum < "$W/img" | cut -d' ' -f1)" ] || { echo "staged bytes differ" >&2; exit 1; }

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
rng() { printf '%s\n' "$@" | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{printf "%.2f–%.2f", lo, hi}'; }
C=$(med "${CAT[@]}")
row() { # name, times...
  local name=$1; shift
  local m=$(med "$@")
  printf '| %s | %.2f s (%s) | %.0f MiB/s | %.2f× |\n' "$name" "$m" "$(rng "$@")" "$(echo "$SIZE_MB / $m" | bc -l)" "$(echo "$m / $C" | bc -l)"
}
echo "Staging ${SIZE_MB} MiB into ext4 on a loop device, median of $RUNS (min–max); time relative to cat:"
echo
echo "| method | time | rate | × cat |"
echo "|---|---|---|---|"
row 'cat img > file && sync (baseline)' "${CAT[@]}"
row 'sha256sum img && cp img file && sync' "${SHA[@]}"
row 'keelctl push, TCP 127.0.0.1' "${TCPT[@]}"
row 'keelctl push, TCP, with a verity tree checked while staged' "${VTCPT[@]}"
row 'keelctl push, Unix socket' "${UNIXT[@]}"
echo
printf 'Staging with the verity tree checked against the same push without it (TCP, medians): %.2f× (goal ≤ 1.1×; the image is %s%% larger with its tree).\n' \
  "$(echo "$(med "${VTCPT[@]}") / $(med "${TCPT[@]}")" | bc -l)" \
  "$(printf '%.2f' "$(echo "($(stat -c %s "$W/imgv") - $(stat -c %s "$W/img")) * 100 / $(stat -c %s "$W/img")" | bc -l)")"
echo
echo "keel-agent memory: VmRSS ${RSS0} KiB after start, ${RSS100} KiB after 100 status requests (VmHWM ${HWM100} KiB);"
echo "peak (VmHWM) ${HWM} KiB after $((RUNS * 2)) pushes of ${SIZE_MB} MiB."
