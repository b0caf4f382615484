#!/bin/sh
# RAUC custom bootloader backend for NVIDIA Jetson (L4T) rootfs A/B through nvbootctrl
# (UNTESTED HERE: no Jetson on the build host; written to the documented nvbootctrl commands:
# `nvbootctrl -t rootfs get-current-slot|set-active-boot-slot N|mark-boot-successful|
# set-slot-as-unbootable N|is-slot-marked-successful N`). Bootname A = slot 0, B = slot 1.
# The Jetson bootloader counts retries itself: a slot not marked successful falls back.
set -eu
NV="${NVBOOTCTRL:-nvbootctrl} -t rootfs"
die() { echo "backend-jetson: $*" >&2; exit 1; }
num() { case "$1" in A) echo 0;; B) echo 1;; *) die "bootname '$1': allowed: A, B";; esac; }
name() { if [ "$1" = 0 ]; then echo A; else echo B; fi; }
case "${1:-}" in
  get-primary)
    # the active boot slot is what `dump-slots-info` calls "Active rootfs slot"
    s=$($NV dump-slots-info 2>/dev/null | sed -n 's/.*[Aa]ctive.*slot[^0-9]*\([01]\).*/\1/p' | head -n1)
    [ -n "$s" ] || s=$($NV get-current-slot)
    name "$s";;
  set-primary) $NV set-active-boot-slot "$(num "$2")";;
  get-state)
    n=$(num "$2")
    if $NV is-slot-marked-successful "$n" >/dev/null 2>&1; then echo good; else echo bad; fi;;
  set-state)
    n=$(num "$2")
    case "$3" in
      good) [ "$($NV get-current-slot)" = "$n" ] && $NV mark-boot-successful || true;;
      bad) $NV set-slot-as-unbootable "$n";;
      *) die "state '$3': allowed: good, bad";;
    esac;;
  get-current) name "$($NV get-current-slot)";;
  *) die "unknown command '${1:-}'";;
esac
