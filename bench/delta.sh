#!/bin/bash
# Delta updates: bytes and time of a delta push against a full push and against casync, on
# image pairs of a Debian 12 minbase root (squashfs, made as `keelctl build` makes it):
#   (a) one 5 MiB file added; (b) one package upgraded (its bookworm-security version, by
#   dpkg, over the tree); (c) rebuilt from the same tree with no change.
# keel: `keelctl push --json` to a real agent over TLS on 127.0.0.1, staging into ext4 on a
# loop device, the device running v1 (its boot state records it). casync: `casync make` of
# v2 into a store served by nginx on 127.0.0.1, `casync extract --seed=v1` from it; its bytes
# are what nginx sent (index and chunks). Everything in a private mount namespace.
#
#   bench/delta.sh [RUNS]      (needs root, debootstrap, casync, nginx, release builds)
set -euo pipefail
RUNS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KEEL_BIN:-$ROOT/target/release}
[ "${KEEL_IN_NS:-}" = 1 ] || exec unshare -m --propagation private env KEEL_IN_NS=1 "$0" "$@"

. "$ROOT/bench/debroot.sh"
W=$(mktemp -d /var/tmp/keel-delta-bench.XXXXXX)
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

# The trees and their images (mksquashfs as keelctl build runs it: sorted, mtimes kept, the
# filesystem's own time fixed).
sq() { mksquashfs "$1" "$2" -noappend -no-progress -quiet -mkfs-time 1700000000; }
mkdir -p "$W/t"
cp -a "$D" "$W/t/1" && rm -f "$W/t/1/.complete"
cp -a "$W/t/1" "$W/t/a"
mkdir -p "$W/t/a/opt"
head -c $((5 << 20)) /dev/urandom > "$W/t/a/opt/added.bin"
# (b): the first of these whose bookworm-security version differs from the tree's.
UPGRADED=
cp -a "$W/t/1" "$W/t/b"
mkdir -p "$W/deb" && chmod 777 "$W/deb"
for p in perl-base tzdata apt; do
  have=$(dpkg-query --admindir="$W/t/b/var/lib/dpkg" -W -f='${Version}' "$p" 2>/dev/null || true)
  (cd "$W/deb" && rm -f ./*.deb && apt-get download -q "$p/bookworm-security" > /dev/null 2>&1) || continue
  deb=$(ls "$W/deb"/*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || continue
  new=$(dpkg-deb -f "$deb" Version)
  [ -n "$have" ] && [ "$new" != "$have" ] || continue
  dpkg --root="$W/t/b" -i "$deb" > "$W/dpkg.log" 2>&1 || { cat "$W/dpkg.log" >&2; exit 1; }
  UPGRADED="$p $have → $new"
  break
done
sq "$W/t/1" "$W/v1.img"
sq "$W/t/a" "$W/a.img"
[ -n "$UPGRADED" ] && sq "$W/t/b" "$W/b.img"
sq "$W/t/1" "$W/c.img"
rm -rf "$W/t"
PAIRS="a b c"
[ -n "$UPGRADED" ] || PAIRS="a c"

"$BIN/keelctl" keygen "$W/key.pem" > /dev/null
"$BIN/keelctl" sign "$W/v1.img" --key "$W/key.pem" --name bench --version 1 > /dev/null
for x in $PAIRS; do
  "$BIN/keelctl" sign "$W/$x.img" --key "$W/key.pem" --name bench --version 2 > /dev/null
done

# The device: newimg on ext4 on a loop device; img holding v1 and a boot state naming it.
truncate -s 512M "$W/newimg.ext4"
mkfs.ext4 -q -F -L newimg -E lazy_itable_init=0,lazy_journal_init=0 "$W/newimg.ext4"
LOOP=$(losetup --show -f "$W/newimg.ext4")
mkdir -p "$W/mnt" "$W/img" "$W/etc" "$W/www" "$W/nginx/tmp"
mount "$LOOP" "$W/mnt"
cp "$W/v1.img" "$W/img/root-squashfs.img"
V1SHA=$(sha256sum < "$W/v1.img" | cut -d' ' -f1)
cat > "$W/img/keel-state.json" <<JSON
{"format":1,"boot_count":1,"current":{"name":"bench","version":1,"sha256":"$V1SHA","size":$(stat -c %s "$W/v1.img")},"old":null,"trial":null,"pending":null,"rejected":[],"events":[]}
JSON
cat > "$W/etc/agent.toml" <<TOML
unix = "$W/etc/agent.sock"
tcp = "127.0.0.1:0"
identity = "$W/etc/identity.pem"
trusted_keys = "$W/key.pem.pub"
newimg_dir = "$W/mnt"
img_dir = "$W/img"
boot_report = "$W/etc/none.json"
name = "bench"
TOML
start_agent() {
  "$BIN/keel-agent" --config "$W/etc/agent.toml" 2> "$W/agent.log" &
  AGENT=$!
  for _ in $(seq 100); do grep -q 'tcp://127.0.0.1:' "$W/agent.log" && break; sleep 0.05; done
  TCP=$(grep -o 'tcp://127.0.0.1:[0-9]*' "$W/agent.log" | head -1)
  [ -n "$TCP" ] || { cat "$W/agent.log" >&2; exit 1; }
}
stop_agent() { kill "$AGENT"; wait "$AGENT" 2>/dev/null || true; AGENT=; }
hwm() { awk '/VmHWM/{print $2}' /proc/$AGENT/status; }
clean_slot() { rm -f "$W/mnt"/* 2>/dev/null || true; sync; }
now() { date +%s.%N; }
# push IMAGE [--no-delta]: prints "seconds json".
push() {
  clean_slot
  local t=$(now) j
  j=$("$BIN/keelctl" -e "$TCP" --agent-key "$W/etc/identity.pem.pub" push --json "$@" 2> /dev/null)
  echo "$(echo "$(now) - $t" | bc) $j"
}
field() { sed -n "s/.*\"$1\":\([0-9a-z]*\).*/\1/p"; }

# nginx for casync's store.
PORT=
for _ in $(seq 100); do
  p=$((20000 + RANDOM % 20000))
  (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { PORT=$p; break; }
done
[ -n "$PORT" ] || { echo "no free port found" >&2; exit 1; }
cat > "$W/nginx/nginx.conf" <<CONF
daemon off; master_process off; user root;
error_log $W/nginx/error.log; pid $W/nginx/nginx.pid;
events { worker_connections 1024; }
http {
  log_format wire '\$request \$status \$bytes_sent';
  access_log $W/nginx/access.log wire;
  client_body_temp_path $W/nginx/tmp; proxy_temp_path $W/nginx/tmp; fastcgi_temp_path $W/nginx/tmp;
  uwsgi_temp_path $W/nginx/tmp; scgi_temp_path $W/nginx/tmp;
  server { listen 127.0.0.1:$PORT; root $W/www; }
}
CONF
nginx -e "$W/nginx/error.log" -p "$W/nginx" -c "$W/nginx/nginx.conf" &
NGINX=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
casync_bytes() { # pair → bytes nginx sent for a seeded extract (checked against the image)
  local x=$1
  casync make --store="$W/www/store-$x" "$W/www/$x.caibx" "$W/$x.img" > /dev/null
  local before=$(wc -l < "$W/nginx/access.log")
  casync extract --seed="$W/v1.img" --store="http://127.0.0.1:$PORT/store-$x" \
    "http://127.0.0.1:$PORT/$x.caibx" "$W/casync-out.img" > /dev/null 2>&1
  cmp -s "$W/casync-out.img" "$W/$x.img" || { echo "casync extract of ($x) differs" >&2; exit 1; }
  rm -f "$W/casync-out.img"
  tail -n +$((before + 1)) "$W/nginx/access.log" | awk '{s += $NF} END {print s + 0}'
}

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
rng() { printf '%s\n' "$@" | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{printf "%.2f–%.2f", lo, hi}'; }
declare -A BYTES CASYNC FULL_T DELTA_T
start_agent
for x in $PAIRS; do
  CASYNC[$x]=$(casync_bytes "$x")
  ft=() dt=()
  for _ in $(seq "$RUNS"); do
    r=$(push "$W/$x.img" --no-delta); ft+=("${r%% *}")
    r=$(push "$W/$x.img"); dt+=("${r%% *}")
    [ "$(echo "$r" | field delta)" = true ] || { echo "($x) was not pushed as a delta: $r" >&2; exit 1; }
    [ "$(sha256sum < "$W/mnt/root-squashfs.img")" = "$(sha256sum < "$W/$x.img")" ] || { echo "($x): staged bytes differ" >&2; exit 1; }
  done
  BYTES[$x]=$(( $(echo "$r" | field sent) + $(echo "$r" | field index) ))
  FULL_T[$x]=$(med "${ft[@]}")
  DELTA_T[$x]=$(med "${dt[@]}")
done
HWM=$(hwm)
WARM=$(grep -o 'root-squashfs.img: [0-9]* bytes chunked into [0-9]* chunks ([0-9]* ms)' "$W/agent.log" | head -1)
[ -z "${KEEL_BENCH_LOG:-}" ] || cp "$W/agent.log" "$KEEL_BENCH_LOG"
stop_agent

name() { case $1 in a) echo "(a) one 5 MiB file added";; b) echo "(b) $UPGRADED";; c) echo "(c) rebuilt, no change";; esac; }
goal() { case $1 in c) echo "≤ 1.0× casync, ≤ 1%";; *) echo "≤ 1.0× casync, ≤ 10%";; esac; }
pct() { echo "$1 * 100 / $2" | bc -l; }
echo "Debian 12 minbase root as squashfs ($(stat -c %s "$W/v1.img") bytes for v1), the device running v1; bytes moved to stage v2:"
echo
echo "| pair | v2 bytes (a full push) | casync (index + chunks) | keel delta (index + chunks) | keel ÷ casync | keel ÷ full | goal |"
echo "|---|---|---|---|---|---|---|"
for x in $PAIRS; do
  full=$(stat -c %s "$W/$x.img")
  c=${CASYNC[$x]}
  k=${BYTES[$x]}
  printf '| %s | %s | %s | %s | %s | %.2f%% | %s |\n' "$(name "$x")" "$full" "$c" "$k" \
    "$(if [ "$c" -gt 0 ]; then printf '%.2f×' "$(echo "$k / $c" | bc -l)"; else echo "—"; fi)" \
    "$(pct "$k" "$full")" "$(goal "$x")"
done
echo
echo "Time of a delta push against a full push of the same v2 (keelctl push over TLS on 127.0.0.1, into ext4 on a loop device, median of $RUNS):"
echo
echo "| pair | full push | delta push | delta ÷ full (goal ≤ 1.0×) |"
echo "|---|---|---|---|"
for x in $PAIRS; do
  printf '| %s | %.2f s | %.2f s | %.2f× |\n' "$(name "$x")" "${FULL_T[$x]}" "${DELTA_T[$x]}" "$(echo "${DELTA_T[$x]} / ${FULL_T[$x]}" | bc -l)"
done
echo
echo "The agent chunks the images it holds once, in the background after it starts (here: ${WARM:-not logged}); a delta that comes before that chunks them itself."
echo
echo "keel-agent peak RSS (VmHWM) over all these pushes: ${HWM} KiB (goal ≤ 16 MiB). casync $(casync --version | head -1 | awk '{print $2}'), its default chunk sizes (16/64/256 KiB) and compression; keel's chunks 8/16/64 KiB, sent uncompressed."
