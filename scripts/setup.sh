#!/bin/bash
# The README's first command: install everything hyperd needs on a fresh Debian 12 (as root), build the
# guest, start hyperd on /var/run/hyper.sock, and show it working.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh

# The guest kernel and initrd (hyperd-mkinitrd), when this version of hyperd has it.
if .venv/bin/python -c "import hyperd.guest.initrd" 2>/dev/null && [ -x .venv/bin/hyperd-mkinitrd ]; then
    .venv/bin/hyperd-mkinitrd
fi

SOCKET=/var/run/hyper.sock
PIDFILE=/var/run/hyperd.pid
LOG=/var/log/hyperd.log
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "setup.sh: hyperd is already running (pid $(cat "$PIDFILE")); restarting it"
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 100); do kill -0 "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null || break; sleep 0.1; done
fi
.venv/bin/twistd --pidfile="$PIDFILE" --logfile="$LOG" hyperd
for _ in $(seq 100); do
    [ "$(curl -s --unix-socket "$SOCKET" http://hyperd/_ping 2>/dev/null)" = OK ] && break
    sleep 0.1
done
[ "$(curl -s --unix-socket "$SOCKET" http://hyperd/_ping)" = OK ] || { echo "hyperd did not start; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
echo "hyperd is running (pid $(cat "$PIDFILE")), log in $LOG, API on unix://$SOCKET"
echo "\$ hyperctl info"
.venv/bin/hyperctl info
echo
echo "\$ hyperctl run --rm busybox echo hello from a VM"
.venv/bin/hyperctl run --rm busybox echo hello from a VM
