#!/usr/bin/env bash
# CNI ADD/DEL latency over N sequential pods (default 100), measured, not asserted:
#  - through cnitool (Debian's libcni 1.1.2: what a runtime does, incl. its result cache), and
#  - the plugin binary alone (our own exec, no libcni), to show what sluice itself costs.
# Runs as root in its own namespaces; needs a release build (cargo build --release).
# SLUICED_ARGS="--attach-mode tc" measures the clsact fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
BIN=$PWD/target/release
[ -x "$BIN/sluice" ] && [ -x "$BIN/sluiced" ] || { echo "build first: cargo build --release" >&2; exit 1; }

ID=slbench$$
NODE=$ID-node
WORK=$(mktemp -d /tmp/$ID.XXXX)
BPFFS=/sys/fs/bpf/$ID
SOCK=$WORK/sluiced.sock
PID=

cleanup() {
    set +e
    for ns in $(ip netns list | awk '{print $1}' | grep "^$ID-p"); do ip netns del "$ns"; done
    [ -n "$PID" ] && kill "$PID" && wait "$PID" 2>/dev/null
    nsenter --net=/run/netns/$NODE "$BIN/sluiced" --cleanup --socket "$SOCK" --state-dir "$WORK/state" --bpffs "$BPFFS" 2>/dev/null
    ip netns del $NODE 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add $NODE
ip -n $NODE link set lo up
nsenter --net=/run/netns/$NODE "$BIN/sluiced" --socket "$SOCK" --state-dir "$WORK/state" --bpffs "$BPFFS" \
    --pod-cidr 10.244.0.0/22 ${SLUICED_ARGS:-} 2>"$WORK/sluiced.log" &
PID=$!
for _ in $(seq 100); do nsenter --net=/run/netns/$NODE "$BIN/sluicectl" --socket "$SOCK" status >/dev/null 2>&1 && break; sleep 0.1; done
mkdir -p "$WORK/net.d"
echo "{\"cniVersion\":\"1.0.0\",\"name\":\"bench\",\"plugins\":[{\"type\":\"sluice\",\"socket\":\"$SOCK\"}]}" > "$WORK/net.d/10.conflist"
CONF="{\"cniVersion\":\"1.0.0\",\"name\":\"bench\",\"type\":\"sluice\",\"socket\":\"$SOCK\"}"

now() { date +%s%N; }
in_node() { nsenter --net=/run/netns/$NODE "$@"; }

stats() { # name, file of nanosecond samples
    sort -n "$2" | awk -v name="$1" '{ a[NR] = $1 } END {
        printf "%-28s n=%d  p50 %.1f ms  p90 %.1f ms  p99 %.1f ms  max %.1f ms\n", name, NR,
        a[int(NR*0.50+0.5)]/1e6, a[int(NR*0.90+0.5)]/1e6, a[int(NR*0.99+0.5)]/1e6, a[NR]/1e6 }'
}

for i in $(seq "$N"); do ip netns add $ID-p$i; done

# 1. Through cnitool.
for i in $(seq "$N"); do
    t=$(now); in_node env CNI_PATH="$BIN" NETCONFPATH="$WORK/net.d" cnitool add bench /run/netns/$ID-p$i >/dev/null; echo $(( $(now) - t )) >> "$WORK/add.cnitool"
done
for i in $(seq "$N"); do
    t=$(now); in_node env CNI_PATH="$BIN" NETCONFPATH="$WORK/net.d" cnitool del bench /run/netns/$ID-p$i >/dev/null; echo $(( $(now) - t )) >> "$WORK/del.cnitool"
done

# 2. The plugin alone (same namespaces, explicit container IDs).
plugin() { # verb, i
    in_node env -i CNI_COMMAND=$1 CNI_CONTAINERID=bench$i CNI_NETNS=/run/netns/$ID-p$i CNI_IFNAME=eth0 CNI_PATH="$BIN" \
        "$BIN/sluice" <<<"$CONF" >/dev/null
}
for i in $(seq "$N"); do t=$(now); plugin ADD $i; echo $(( $(now) - t )) >> "$WORK/add.plugin"; done
for i in $(seq "$N"); do t=$(now); plugin DEL $i; echo $(( $(now) - t )) >> "$WORK/del.plugin"; done

# 3. What exec + nsenter alone cost (the floor under every sample above).
for i in $(seq "$N"); do t=$(now); in_node env -i CNI_COMMAND=VERSION "$BIN/sluice" </dev/null >/dev/null; echo $(( $(now) - t )) >> "$WORK/version.plugin"; done

echo "sluice CNI latency, $N sequential pods, $(nproc) CPUs, kernel $(uname -r):"
stats "ADD via cnitool" "$WORK/add.cnitool"
stats "DEL via cnitool" "$WORK/del.cnitool"
stats "ADD plugin alone" "$WORK/add.plugin"
stats "DEL plugin alone" "$WORK/del.plugin"
stats "VERSION (exec floor)" "$WORK/version.plugin"
