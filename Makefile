# keel — the two commands a newcomer needs: `make demo` and `make test`.
# Both install what they use (Debian 12, as root) before running.

CARGO   ?= cargo
TARGET  := x86_64-unknown-linux-gnu
STATIC  := target/$(TARGET)/release
# Debian packages the build and the tests use, by name.
APT_PKGS := casync cryptsetup-bin libblkid-dev squashfs-tools erofs-utils e2fsprogs fdisk util-linux cpio kmod openssl systemd bc busybox-static xz-utils zstd gzip gcc libc6-dev dropbear-bin nginx curl umoci skopeo docker-registry apache2-utils debootstrap
FEATURES := --features initstage/failpoints

.PHONY: test check demo deps lint build static sizes units fuzz bench vm-bins vm demo-local bench-smoke vsock-device garage clean

## deps: install missing Debian packages and cargo components
deps:
	@# policy-rc.d: packages that ship a service (nginx) are installed, not started; the
	@# tests start their own on 127.0.0.1.
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		rc=/usr/sbin/policy-rc.d; own=""; \
		[ -e $$rc ] || { printf '#!/bin/sh\nexit 101\n' > $$rc; chmod +x $$rc; own=1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; st=$$?; \
		[ -z "$$own" ] || rm -f $$rc; exit $$st; \
	fi
	@# QEMU 7.2 from Debian 12; its qemu-utils must come along (a newer backported qemu-utils
	@# on the machine would otherwise block the install).
	@command -v qemu-system-x86_64 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends --allow-downgrades qemu-system-x86 qemu-utils/bookworm; }
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust with rustup first"; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@[ -d "$$(rustc --print sysroot)/lib/rustlib/src/rust/library" ] || rustup component add rust-src

## lint: formatting and clippy, warnings are errors
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings
	@# keel-unpack as initstage links it: without the builder's zstd feature.
	$(CARGO) clippy -p keel-unpack --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps -q
	@# The device agent links no host-only crate.
	@! $(CARGO) tree -e normal,build -p keel-agent --prefix none | grep -E '^(keelctl|keel-build|keel-oci|tar|flate2) ' || { echo "keel-agent links a host-only crate"; exit 1; }

## build: debug binaries (initstage with failpoints: the integration tests need them)
build: deps
	$(CARGO) build --workspace $(FEATURES)

## test: everything CI runs (the VM scenarios included)
test: lint build static vm-bins vsock-device garage
	$(CARGO) test --workspace $(FEATURES)
	$(CARGO) test -p keel-unpack
	$(MAKE) --no-print-directory units fuzz sizes

## check: the fast edit loop: fmt, clippy, and the tests that need neither root nor QEMU
## (unit tests of every crate, the agent's in-memory protocol tests)
check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps -q
	$(CARGO) test $(FEATURES) -p keel-proto -p keel-sys -p keel-unpack -p initstage -p keel-agent -p keelctl -p keel-build -p keel-oci
	$(CARGO) test -p keel-unpack

## units: systemd-analyze verify on the units, sh -n on the OpenRC scripts
units: build
	systemd/check.sh target/debug

## fuzz: the frame-decoder fuzz target for FUZZ_SECONDS (stable toolchain, RUSTC_BOOTSTRAP)
FUZZ_SECONDS ?= 20
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run frame_decoder -- -max_total_time=$(FUZZ_SECONDS)

## bench: every benchmark, as ratios against baselines run alongside -> bench/results.md
bench: build static vm-bins
	$(CARGO) build --release -p keel-agent -p keelctl
	bench/run.sh

## bench-smoke: one short iteration of every benchmark (CI), nothing kept
bench-smoke: build static vm-bins
	$(CARGO) build --release -p keel-agent -p keelctl
	BENCH_SMOKE=1 bench/run.sh

# initstage goes into every initramfs, so it is built for size: std itself is rebuilt with
# the profile's settings (-Z build-std: panic=abort without the backtrace symbolizer, std's
# optimize_for_size), no unwind tables (nothing unwinds), ed25519's portable backend only (one
# signature check a promotion needs no AVX2 copy), linked non-PIE, and panic messages without
# file:line (-Z location-detail=none: 21 KB, the room the gzip and xz module decoders take),
# and no .eh_frame_hdr (the unwinder's index, 15 KB: nothing unwinds; the room dm-verity takes).
# RUSTC_BOOTSTRAP lets the
# stable toolchain take the -Z flags; rust-src comes from `make deps`. Own target dir: other
# RUSTFLAGS than the rest.
INITSTAGE_RUSTFLAGS := -C target-feature=+crt-static -C relocation-model=static \
	-C force-unwind-tables=no --cfg curve25519_dalek_backend="serial" -Zlocation-detail=none \
	-C link-arg=-Wl,--no-eh-frame-hdr
INITSTAGE_BUILD = RUSTC_BOOTSTRAP=1 RUSTFLAGS='$(INITSTAGE_RUSTFLAGS)' \
	$(CARGO) build --release -p initstage --target $(TARGET) \
	-Z build-std=std,panic_abort -Z build-std-features=optimize_for_size

## static: initstage and keel-agent as static binaries, as they go into images
static: deps
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p keel-agent -p keelctl --target $(TARGET)
	$(INITSTAGE_BUILD) --target-dir target/initstage
	ln -f target/initstage/$(TARGET)/release/initstage $(STATIC)/initstage

## vsock-device: the user-space vhost-user vsock device the vsock scenario uses
vsock-device: deps
	@command -v vhost-device-vsock >/dev/null || $(CARGO) install vhost-device-vsock --locked

## garage: Garage, the S3-compatible store the pull tests read a private bucket from (a debug
## build without debug info: it builds in minutes, and the tests need no speed from it)
garage: deps
	@command -v garage >/dev/null || CARGO_PROFILE_DEV_DEBUG=0 $(CARGO) install garage --locked --debug \
		--no-default-features --features bundled-libs,lmdb

## vm-bins: the static binaries the VM tests pack (initstage with failpoints), own target dir
vm-bins: deps
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p keel-agent -p keelctl --target $(TARGET) --target-dir target/vm
	$(INITSTAGE_BUILD) --features failpoints --target-dir target/vm-initstage
	ln -f target/vm-initstage/$(TARGET)/release/initstage target/vm/$(TARGET)/release/initstage

## sizes: the static binaries' sizes, checked against the goals (initstage ≤ 1.55 MB, agent ≤ 4 MB)
sizes:
	@for b in initstage keel-agent keelctl; do \
		printf '%-10s (static, release): %s bytes\n' $$b "$$(stat -c %s $(STATIC)/$$b)"; \
		ldd $(STATIC)/$$b 2>&1 | grep -q 'statically linked\|not a dynamic' || { echo "$$b is not static"; exit 1; }; \
	done
	@[ $$(stat -c %s $(STATIC)/initstage) -le 1550000 ] || { echo "initstage is over 1,550,000 bytes"; exit 1; }
	@[ $$(stat -c %s $(STATIC)/keel-agent) -le 4000000 ] || { echo "keel-agent is over 4,000,000 bytes"; exit 1; }

## vm: only the VM scenarios (one alone: make vm VM=update_cycle)
vm: build vm-bins vsock-device
	$(CARGO) test -p keel-vm-tests --test vm --test oci --test verity -- $(VM)

## demo: boots v1 in QEMU, pushes v2, reboots into it, pushes a bad v3, shows the rollback
demo: build vm-bins vsock-device
	$(CARGO) run -q -p keel-vm-tests --bin keel-vm-demo

## demo-local: the same cycle without QEMU (initstage prepare on loop devices)
demo-local: build
	$(CARGO) run -q -p keel-tests --bin keel-demo

clean:
	$(CARGO) clean
