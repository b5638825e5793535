#!/bin/bash
# Checks the units with systemd-analyze verify against the freshly built binaries (installed
# into a scratch root, never into /usr/bin), the dracut module's unit and shell syntax, and the
# OpenRC scripts' shell syntax.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/debug}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
# The stock units (sysinit.target, boot-complete.target, ...) the keel units refer to.
cp -a /lib/systemd/system "$root/usr/lib/systemd/"
cp "$bin/keel-agent" "$bin/keelctl" "$bin/initstage" "$root/usr/bin/"
cp "$here"/*.service "$here"/dracut/90keel/*.service "$root/etc/systemd/system/"
units=(keel-agent.service keel-mark-good.service keel-clean-trash.service keel-prepare.service)
out=$(cd "$root/etc/systemd/system" && systemd-analyze verify --root="$root" "${units[@]}" 2>&1) || { echo "$out"; exit 1; }
# verify prints warnings without failing: any line about our units is a defect.
if echo "$out" | grep -E "keel-[a-z-]+\.service" ; then
  exit 1
fi
bash -n "$here/dracut/90keel/module-setup.sh"
for s in "$here"/*.openrc; do sh -n "$s"; done
echo "systemd units, the dracut module and OpenRC scripts: ok"
