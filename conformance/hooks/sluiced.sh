#!/bin/sh
# Hooks for running cni-conformance against sluice: start/stop (SIGTERM) or kill9 (SIGKILL) sluiced
# inside the runner's node namespace (the runner runs hooks there), clean up its pins and state,
# print its allocations.
#
#   cni-conformance --cni-path "$SLUICE_BIN_DIR:/usr/lib/cni" --conflist conformance/conflists/sluice.conflist \
#     --setup 'conformance/hooks/sluiced.sh start' --teardown 'conformance/hooks/sluiced.sh stop' \
#     --cleanup 'conformance/hooks/sluiced.sh cleanup' --alloc-cmd 'conformance/hooks/sluiced.sh alloc'
#
# Needs SLUICE_BIN_DIR (holding sluiced and sluicectl); the runner sets CONFORMANCE_WORKDIR (the
# socket and state live there, as sluice.conflist's @WORKDIR@ says) and CONFORMANCE_ID (a unique
# name, used for the bpffs directory).
set -eu
bin=${SLUICE_BIN_DIR:?set SLUICE_BIN_DIR to the directory holding sluiced and sluicectl}
w=${CONFORMANCE_WORKDIR:?run by cni-conformance}
sock=$w/sluiced.sock
state=$w/sluiced-state
bpffs=/sys/fs/bpf/${CONFORMANCE_ID:?run by cni-conformance}
cidr=${SLUICE_POD_CIDR:-10.244.0.0/24}

# Alive and not a zombie (an orphaned daemon's zombie may linger: PID 1 need not reap it).
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$1/stat" | cut -c1)
    [ "$st" != Z ]
}

case "${1:-}" in
start)
    mkdir -p "$state"
    "$bin/sluiced" --socket "$sock" --state-dir "$state" --bpffs "$bpffs" --node-name conformance \
        --pod-cidr "$cidr" >>"$w/sluiced.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$w/sluiced.pid"
    i=0
    until "$bin/sluicectl" --socket "$sock" status >/dev/null 2>&1; do
        i=$((i + 1))
        if ! alive "$pid"; then
            echo "sluiced exited during start-up:"; tail -n 20 "$w/sluiced.log"; exit 1
        fi
        if [ "$i" -gt 400 ]; then
            echo "sluiced not ready after 20 s:"; tail -n 20 "$w/sluiced.log"; exit 1
        fi
        sleep 0.05
    done
    ;;
stop)
    [ -f "$w/sluiced.pid" ] || exit 0
    pid=$(cat "$w/sluiced.pid")
    rm -f "$w/sluiced.pid"
    alive "$pid" || exit 0
    kill -TERM "$pid" 2>/dev/null || exit 0
    i=0
    while alive "$pid"; do
        i=$((i + 1))
        if [ "$i" -gt 200 ]; then
            echo "sluiced ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; break
        fi
        sleep 0.05
    done
    ;;
kill9)
    # Like stop, but SIGKILL: what a crash or an OOM kill does.
    [ -f "$w/sluiced.pid" ] || exit 0
    pid=$(cat "$w/sluiced.pid")
    rm -f "$w/sluiced.pid"
    alive "$pid" || exit 0
    kill -KILL "$pid" 2>/dev/null || true
    i=0
    while alive "$pid" && [ "$i" -lt 200 ]; do i=$((i + 1)); sleep 0.05; done
    ;;
cleanup)
    "$bin/sluiced" --cleanup --socket "$sock" --state-dir "$state" --bpffs "$bpffs" --pod-cidr "$cidr" >>"$w/sluiced.log" 2>&1 || {
        echo "sluiced --cleanup failed:"; tail -n 20 "$w/sluiced.log"; rm -rf "$bpffs"; exit 1; }
    rm -rf "$bpffs"
    ;;
alloc)
    # "pod CIDR 10.244.0.0/24 (253 free), ..." -> "253 free"
    "$bin/sluicectl" --socket "$sock" status | sed -n 's/.*(\([0-9]* free\)).*/\1/p'
    ;;
*)
    echo "usage: $0 start|stop|kill9|cleanup|alloc" >&2; exit 2
    ;;
esac
