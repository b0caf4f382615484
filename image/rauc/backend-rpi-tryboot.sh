#!/bin/sh
# RAUC custom bootloader backend for Raspberry Pi 4/5 firmware "tryboot" (UNTESTED HERE: no Pi
# firmware on the build host; written to the firmware's documented config.txt interface).
#
# One FAT boot partition (p1, mounted at /boot/firmware) holds a folder per slot
# (slot-a/, slot-b/: kernel, initramfs, cmdline.txt with root=PARTUUID=<disk>-02 or -03) and
# config.txt with
#     [all]
#     os_prefix=slot-a/          <- the committed slot (written by set-primary)
#     [tryboot]
#     os_prefix=slot-b/          <- used only for a boot started with `reboot "0 tryboot"`
# set-primary commits [all] to the slot and names it in [tryboot] too: RAUC 1.8 expects the
# slot primary and good right after set-primary, so the firmware's one-shot fallback is not
# used; rollback is the post-boot health check's (set-state bad on the committed slot commits
# the other one, then the box reboots). A watchdog reboot before the check boots the new
# slot again; the check's deadline counts from its first boot, so it still rolls back.
#   get-primary / set-primary NAME / get-state NAME / set-state NAME good|bad / get-current
set -eu
BOOT="${ECHOEL_BOOT_FIRMWARE:-/boot/firmware}"
CONF="$BOOT/config.txt"
STATE="${ECHOEL_BOOT_STATE:-/data/rauc/boot-state}"
mkdir -p "$STATE"
die() { echo "backend-rpi-tryboot: $*" >&2; exit 1; }
check_name() { case "$1" in A|B) ;; *) die "bootname '$1': allowed: A, B";; esac; }
prefix() { if [ "$1" = A ]; then echo slot-a/; else echo slot-b/; fi; }
committed() {
  p=$(sed -n '/^\[all\]/,/^\[/{s/^os_prefix=//p}' "$CONF" | head -n1)
  if [ "$p" = slot-b/ ]; then echo B; else echo A; fi
}
write_conf() { # $1 committed slot, $2 tryboot slot
  tmp="$CONF.tmp"
  sed '/^# echoel-ab begin/,/^# echoel-ab end/d' "$CONF" > "$tmp"
  { echo "# echoel-ab begin"; echo "[all]"; echo "os_prefix=$(prefix "$1")";
    echo "[tryboot]"; echo "os_prefix=$(prefix "$2")"; echo "[all]"; echo "# echoel-ab end"; } >> "$tmp"
  sync "$tmp"; mv "$tmp" "$CONF"; sync "$BOOT"
}
state_of() { if [ -f "$STATE/state.$1" ]; then cat "$STATE/state.$1"; else echo good; fi; }
case "${1:-}" in
  get-primary) committed;;
  set-primary) check_name "$2"; printf 'good\n' > "$STATE/state.$2"; write_conf "$2" "$2";;
  get-state) check_name "$2"; state_of "$2";;
  set-state)
    check_name "$2"
    case "$3" in good|bad) ;; *) die "state '$3': allowed: good, bad";; esac
    printf '%s\n' "$3" > "$STATE/state.$2"
    if [ "$3" = bad ] && [ "$(committed)" = "$2" ]; then
      other=A; [ "$2" = A ] && other=B
      write_conf "$other" "$other"
    fi;;
  get-current)
    for w in $(cat /proc/cmdline); do
      case "$w" in rauc.slot=*) echo "${w#rauc.slot=}"; exit 0;; esac
    done
    committed;;
  *) die "unknown command '${1:-}'";;
esac
