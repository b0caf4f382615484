#!/bin/sh
# RAUC custom bootloader backend with its state in plain files: the qemu image (whose
# "bootloader" is the harness that starts qemu) and the host tests.
#
#   get-primary            print the bootname to boot next (A or B)
#   set-primary NAME       make NAME the one to boot next; also marks it good (RAUC 1.8 calls
#                          `set-state NAME bad` before writing a slot and then only
#                          `set-primary NAME`)
#   get-state NAME         print good or bad
#   set-state NAME STATE   STATE is good or bad
#   get-current            print the booted bootname (rauc.slot= on the kernel command line)
#
# State folder: $ECHOEL_BOOT_STATE, default /data/rauc/boot-state; files primary, state.A,
# state.B (written atomically). The harness boots `primary` when it is good, else the other
# slot if that one is good: a slot marked bad is never booted again.
set -eu
DIR="${ECHOEL_BOOT_STATE:-/data/rauc/boot-state}"
mkdir -p "$DIR"

die() { echo "backend-file: $*" >&2; exit 1; }
check_name() { case "$1" in A|B) ;; *) die "bootname '$1': allowed: A, B";; esac; }
put() { printf '%s\n' "$2" > "$DIR/$1.tmp" && sync "$DIR/$1.tmp" 2>/dev/null; mv "$DIR/$1.tmp" "$DIR/$1"; }
state_of() { if [ -f "$DIR/state.$1" ]; then cat "$DIR/state.$1"; else echo good; fi; }
primary() { if [ -f "$DIR/primary" ]; then cat "$DIR/primary"; else echo A; fi; }

cmd="${1:-}"
case "$cmd" in
  get-primary)
    p=$(primary)
    if [ "$(state_of "$p")" = good ]; then echo "$p"; exit 0; fi
    other=A; [ "$p" = A ] && other=B
    if [ "$(state_of "$other")" = good ]; then echo "$other"; exit 0; fi
    die "no good slot (primary $p is bad, $other is bad)";;
  set-primary)
    [ $# -eq 2 ] || die "usage: set-primary A|B"
    check_name "$2"; put "state.$2" good; put primary "$2";;
  get-state)
    [ $# -eq 2 ] || die "usage: get-state A|B"
    check_name "$2"; state_of "$2";;
  set-state)
    [ $# -eq 3 ] || die "usage: set-state A|B good|bad"
    check_name "$2"
    case "$3" in good|bad) ;; *) die "state '$3': allowed: good, bad";; esac
    put "state.$2" "$3";;
  get-current)
    for w in $(cat /proc/cmdline); do
      case "$w" in rauc.slot=*) echo "${w#rauc.slot=}"; exit 0;; esac
    done
    primary;;
  *) die "unknown command '$cmd': get-primary, set-primary, get-state, set-state, get-current";;
esac
