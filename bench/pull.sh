#!/bin/bash
# Pull throughput and cost: a device's agent pulling an image from nginx on 127.0.0.1 into an
# ext4 newimg on a loop device, against `curl -o file URL && sync` into the same filesystem;
# the agent's peak RSS during a pull; the bytes of a poll that finds nothing new. Everything
# runs in a private mount namespace; the loop device is detached on exit.
#
#   bench/pull.sh [SIZE_MB] [RUNS]      (needs root, nginx, curl, release keel-agent, keelctl)
set -euo pipefail
SIZE_MB=${1:-1024}
RUNS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KEEL_BIN:-$ROOT/target/release}
[ "${KEEL_IN_NS:-}" = 1 ] || exec unshare -m --propagation private env KEEL_IN_NS=1 "$0" "$@"

W=$(mktemp -d /var/tmp/keel-pull-bench.XXXXXX)
LOOP=
AGENT=
NGINX=
cleanup() {
  [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
  [ -n "$NGINX" ] && kill "$NGINX" 2>/dev/null && wait "$NGINX" 2>/dev/null || true
  mountpoint -q "$W/mnt" && umount "$W/mnt"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  rm -rf "$W"
}
trap cleanup EXIT

truncate -s $((SIZE_MB * 2 + 256))M "$W/newimg.ext4"
mkfs.ext4 -q -F -L newimg -E lazy_itable_init=0,lazy_journal_init=0 "$W/newimg.ext4"
LOOP=$(losetup --show -f "$W/newimg.ext4")
mkdir -p "$W/mnt" "$W/etc" "$W/www" "$W/nginx/tmp"
mount "$LOOP" "$W/mnt"
head -c $((SIZE_MB << 20)) /dev/urandom > "$W/img"
"$BIN/keelctl" keygen "$W/etc/key.pem" > /dev/null
"$BIN/keelctl" sign "$W/img" --key "$W/etc/key.pem" --name bench --version 2 > /dev/null
"$BIN/keelctl" publish "$W/img" --channel "$W/www/ch" > /dev/null
rm "$W/img"
SHA=$(ls "$W/www/ch/images" | grep -v "\.chunks$")
cat "$W/www/ch/images/$SHA" > /dev/null

start_nginx() {
  cat > "$W/nginx/nginx.conf" <<CONF
daemon off; master_process off; user root;
error_log $W/nginx/error.log; pid $W/nginx/nginx.pid;
events { worker_connections 1024; }
http {
  log_format wire '\$request \$status \$bytes_sent \$request_length';
  access_log $W/nginx/access.log wire;
  client_body_temp_path $W/nginx/tmp; proxy_temp_path $W/nginx/tmp; fastcgi_temp_path $W/nginx/tmp;
  uwsgi_temp_path $W/nginx/tmp; scgi_temp_path $W/nginx/tmp;
  sendfile on;
  server { listen 127.0.0.1:$PORT; root $W/www; }
}
CONF
  nginx -e "$W/nginx/error.log" -p "$W/nginx" -c "$W/nginx/nginx.conf" &
  NGINX=$!
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/" && return 0
    kill -0 "$NGINX" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
# A random port; another if it is taken.
for _ in 1 2 3 4 5; do
  PORT=$((30000 + RANDOM % 20000))
  start_nginx && break
  kill "$NGINX" 2>/dev/null || true; wait "$NGINX" 2>/dev/null || true; NGINX=
done
[ -n "$NGINX" ] || { echo "nginx did not start: $(cat "$W/nginx/error.log")" >&2; exit 1; }
URL="http://127.0.0.1:$PORT/ch"

cat > "$W/etc/agent.toml" <<TOML
unix = "$W/etc/agent.sock"
trusted_keys = "$W/etc/key.pem.pub"
newimg_dir = "$W/mnt"
img_dir = "$W/etc"
boot_report = "$W/etc/none.json"
name = "bench"
[pull]
url = "$URL"
interval_secs = 3600
jitter_secs = 0
TOML

now() { date +%s.%N; }
clean_slot() { rm -f "$W/mnt"/* "$W/mnt"/.[!.]* 2>/dev/null || true; sync; }
t_curl() { clean_slot; local t=$(now); curl -s -o "$W/mnt/file" "$URL/images/$SHA"; sync; echo "$(now) - $t" | bc; }
# A fresh agent polls at once (jitter 0); timed from its start to the staged image's log line.
# (Not in a $(…): the agent would hold the substitution's pipe open.)
t_pull() {
  clean_slot
  : > "$W/agent.log"
  local t=$(now)
  "$BIN/keel-agent" --config "$W/etc/agent.toml" > /dev/null 2> "$W/agent.log" &
  AGENT=$!
  until grep -q 'pull: staged' "$W/agent.log"; do
    if grep -q 'pull failed\|not taken' "$W/agent.log"; then cat "$W/agent.log" >&2; exit 1; fi
    sleep 0.01
  done
  PULL+=("$(echo "$(now) - $t" | bc)")
  HWMS+=("$(awk '/VmHWM/{print $2}' /proc/$AGENT/status)")
}

declare -a CURL PULL HWMS
for i in $(seq "$RUNS"); do
  CURL+=("$(t_curl)")
  t_pull
  if [ "$i" -lt "$RUNS" ]; then kill "$AGENT"; wait "$AGENT" 2>/dev/null || true; AGENT=; fi
done
[ "$(sha256sum < "$W/mnt/root-squashfs.img" | cut -d' ' -f1)" = "$SHA" ] || { echo "staged bytes differ" >&2; exit 1; }
# A poll that finds nothing new: one conditional GET answered 304.
before=$(wc -l < "$W/nginx/access.log")
"$BIN/keelctl" -e "unix://$W/etc/agent.sock" pull-now > /dev/null
for _ in $(seq 200); do [ "$(wc -l < "$W/nginx/access.log")" -gt "$before" ] && grep -q 'no change' "$W/agent.log" && break; sleep 0.05; done
POLL=$(tail -n +$((before + 1)) "$W/nginx/access.log")

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
rng() { printf '%s\n' "$@" | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{printf "%.2f–%.2f", lo, hi}'; }
C=$(med "${CURL[@]}")
row() {
  local name=$1; shift
  local m=$(med "$@")
  printf '| %s | %.2f s (%s) | %.0f MiB/s | %.2f× |\n' "$name" "$m" "$(rng "$@")" "$(echo "$SIZE_MB / $m" | bc -l)" "$(echo "$m / $C" | bc -l)"
}
echo "Pulling ${SIZE_MB} MiB from nginx on 127.0.0.1 into ext4 on a loop device, median of $RUNS (min–max); time relative to curl:"
echo
echo "| method | time | rate | × curl |"
echo "|---|---|---|---|"
row 'curl -o file URL && sync (baseline)' "${CURL[@]}"
row 'keel-agent [pull]: poll, admit, fetch, hash, commit' "${PULL[@]}"
echo
echo "keel-agent peak RSS (VmHWM) during a pull: $(med "${HWMS[@]}") KiB (runs: ${HWMS[*]})."
echo "A poll that finds nothing new: $(echo "$POLL" | wc -l) request(s): $(echo "$POLL" | awk '{printf "%s %s %s, %d bytes sent, %d bytes of request; ", $1, $2, $4, $5, $6}')"
