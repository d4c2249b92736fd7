#!/usr/bin/env bash
# The benchmark suite (issue 9; see bench/README.md): sluice beside the direct path and
# kube-proxy's iptables (nft and legacy backends) and nftables modes, at 1, 1k and 10k services.
#
#   scripts/bench.sh [--quick] [--rounds R] [--seconds S] [--services 1,1000,10000]
#                    [--modes direct,iptables-nft,iptables-legacy,nftables,sluice] [--only FIGURES]
#                    [--clients K] [--threads T] [--cni-pods P] [--mem-pods P]
#                    [--mem-services N] [--timeout SECS] [--setup-timeout SECS] [--out DIR]
#
# FIGURES: conn,rr,prog,bpf,cni,mem (or 1-6). Writes bench/results/<date>-<host>.{json,md,*.svg}
# (--quick: bench/results/quick-*; a partial run: <date>-<host>-<figures>.*).
# Installs what it needs on a fresh Debian 12 (scripts/install-deps.sh), builds the release
# binaries if needed, runs as root in its own namespaces (names slb<pid>-*), and removes every
# namespace, pin, directory and process it made, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh: run as root (namespaces, BPF)" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) ARGS+=(--quick); shift ;;
        --rounds|--seconds|--services|--modes|--only|--clients|--threads|--cni-pods|--mem-pods|--mem-services|--out|--timeout|--setup-timeout)
            [ $# -ge 2 ] || { echo "bench.sh: $1 needs a value" >&2; usage 2; }
            ARGS+=("$1" "$2"); shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
CMDLINE="scripts/bench.sh ${ARGS[*]:-}"

bash scripts/install-deps.sh
echo "== build (release; a no-op when up to date)" >&2
nice -n 10 cargo build --release --locked -q
nice -n 10 cargo build --release --locked -q -p sluice-bench
BIN=$PWD/target/release

PREFIX=slb$$
CHILD=
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        kill -TERM "$CHILD" 2>/dev/null          # it removes what it registered
        for _ in $(seq 100); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CHILD" 2>/dev/null
    fi
    # Whatever is left (a killed child): namespaces with their processes, pins, directories.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-"); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf /sys/fs/bpf/"$PREFIX"-* /tmp/"$PREFIX"-* 2>/dev/null
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$BIN/sluice-bench" run --prefix "$PREFIX" --command "$CMDLINE" "${ARGS[@]}" &
CHILD=$!
wait "$CHILD"
