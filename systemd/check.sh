#!/bin/bash
# Checks the units with systemd-analyze verify against the freshly built binaries (installed
# into a scratch root, never into /usr/bin), and the OpenRC scripts' shell syntax.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/debug}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
# The stock units (sysinit.target, boot-complete.target, ...) the keel units refer to.
cp -a /lib/systemd/system "$root/usr/lib/systemd/"
cp "$bin/keel-agent" "$bin/keelctl" "$root/usr/bin/"
cp "$here"/*.service "$root/etc/systemd/system/"
out=$(cd "$root/etc/systemd/system" && systemd-analyze verify --root="$root" keel-agent.service keel-mark-good.service 2>&1) || { echo "$out"; exit 1; }
# verify prints warnings without failing: any line about our units is a defect.
if echo "$out" | grep -E "keel-(agent|mark-good)\.service" ; then
  exit 1
fi
for s in "$here"/*.openrc; do sh -n "$s"; done
echo "systemd units and OpenRC scripts: ok"
