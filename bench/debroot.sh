# Sourced by the benchmarks that need a Debian root: sets D to a Debian 12 minbase tree
# (debootstrap, made once and cached under target/bench-build/debroot). Needs ROOT.
CACHE=$ROOT/target/bench-build
if [ ! -e "$CACHE/debroot/.complete" ]; then
  rm -rf "$CACHE/debroot"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase bookworm "$CACHE/debroot" http://deb.debian.org/debian > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$CACHE/debroot/var/cache/apt/archives/"*.deb
  touch "$CACHE/debroot/.complete"
fi
D=$CACHE/debroot
