# Echoel Box. `make run`: the box's stack on this machine. `make test`: the whole suite.
# Both install what they need (Debian packages as root, a venv with the project in it).

SHELL := /bin/bash
PY_SYS ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
ECHOEL := $(VENV)/bin/echoel
APT_PACKAGES := python3-venv python3-dev gcc libasound2-dev libasound2-plugins jackd2 \
	libsystemd-dev pkg-config rt-tests alsa-utils util-linux procps \
	mosquitto postgresql libsndfile1 ffmpeg fluidsynth fluid-soundfont-gm \
	linuxptp ethtool iproute2 bluez dbus-daemon \
	bmap-tools e2fsprogs dosfstools mtools fdisk genimage zstd rauc squashfs-tools dbus \
	gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
STAMP := $(VENV)/.installed
DURATION ?=
BENCH_SECONDS ?= 60

MODELS := build/models
MODEL_STAMP := $(MODELS)/basic-pitch/active

.PHONY: bundle setup apt models run test test-e2e image bench lint clean

setup: apt $(STAMP) $(MODEL_STAMP)

# On-device models are fetched, never committed: basic-pitch's nmp.tflite from its PyPI wheel
# (sha256-checked), installed into the model store under build/models.
models: $(MODEL_STAMP)
$(MODEL_STAMP): | $(STAMP)
	$(PY) -m echoel.daemon.model_fetch --store $(MODELS)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or install: $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: setup
	$(ECHOEL) demo $(if $(DURATION),--duration $(DURATION))

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

# `make image BOARD=rpi4|rpi5|jetson|qemu-amd64`: a bootable image under build/image/BOARD/
# (image, bmap, .zst, SHA256SUMS, manifest.json); root, a few minutes with the base cached.
BOARD ?= qemu-amd64
IMAGE_APT := mmdebstrap genimage bmap-tools dosfstools mtools e2fsprogs fdisk zstd openssl \
	qemu-system-x86 qemu-user-static binfmt-support arch-test mosquitto rauc squashfs-tools

image: setup models
	@[ "$$(id -u)" = 0 ] || { echo "make image needs root (chroot, mounts)" >&2; exit 1; }
	@missing=$$(for p in $(IMAGE_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing; fi
	$(PY) image/build_image.py --board $(BOARD) $(if $(SNAPSHOT),--snapshot $(SNAPSHOT)) \
		$(if $(UPDATE_CA),--update-ca $(UPDATE_CA))

# `make bundle BOARD=qemu-amd64 RELEASE=2026.11.2`: a signed RAUC bundle (verity) of the built
# image's rootfs -> build/bundles/echoel-BOARD-RELEASE.raucb; signed by the update CA in
# UPDATE_CA_DIR (the image's development CA unless given; the fleet's for real releases).
RELEASE ?= $(shell date +%Y.%m.%d)
UPDATE_CA_DIR ?= build/image/dev-update-ca
bundle: setup
	$(PY) image/release_bundle.py --board $(BOARD) --release $(RELEASE) \
		--update-ca $(UPDATE_CA_DIR) $(if $(BOX_TOML),--box-toml $(BOX_TOML))

# The end-to-end checks: build the qemu image, flash, provision and boot it under qemu (TCG),
# and see the box join a fleet on this machine's loopback.
test-e2e: setup
	$(MAKE) image BOARD=qemu-amd64
	ECHOEL_E2E=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/e2e

BENCH_AREAS ?= engine dsp ml fleet aes67 image bio ota

# `make bench`: every area; BENCH_AREAS="dsp" for one; BENCH_QUICK=1 for short runs.
bench: setup
	@if [[ " $(BENCH_AREAS) " == *" engine "* ]]; then \
		$(PY) bench/engine_bench.py --seconds $(BENCH_SECONDS); fi
	$(PY) bench/bench_all.py $(if $(BENCH_QUICK),--quick) \
		$(foreach a,$(filter-out engine,$(BENCH_AREAS)),--only $(a))

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
