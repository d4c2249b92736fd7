#!/usr/bin/env bash
# README command 1: set up a fresh Debian 12 machine (as root), build sluice, and run a node in
# network namespaces: sluiced in a "node" namespace (the host's real interfaces are never touched),
# three pods added with the real plugin through cnitool, pod-to-pod and node-to-pod traffic, a
# ClusterIP Service whose backend prints the client's real IP, and the dataplane's own view
# (counters, services, conntrack). Everything is removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

bash scripts/install-deps.sh
echo "== building sluice"
cargo build --release --locked
BIN=$ROOT/target/release

NODE=sluice-demo-node
EXT=sluice-demo-ext
PODS=(sluice-demo-pod1 sluice-demo-pod2 sluice-demo-pod3)
WORK=/tmp/sluice-demo
BPFFS=/sys/fs/bpf/sluice-demo
SOCK=$WORK/sluiced.sock
DAEMON_PID=

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_node() { nsenter --net=/run/netns/$NODE -- "$@"; }
in_pod() { local p=$1; shift; nsenter --net=/run/netns/$p -- "$@"; }
cni() { in_node env CNI_PATH="$BIN:/usr/lib/cni" NETCONFPATH="$WORK/net.d" cnitool "$@"; }
ctl() { in_node "$BIN/sluicectl" --socket "$SOCK" "$@"; }

cleanup() {
    set +e
    step "cleaning up"
    for p in "${PODS[@]}"; do
        [ -e /run/netns/$p ] || continue
        ip netns pids $p | xargs -r kill 2>/dev/null   # the demo's servers inside the pod
        cni del sluice /run/netns/$p 2>/dev/null
        ip netns del $p 2>/dev/null
    done
    if [ -n "$DAEMON_PID" ]; then kill -TERM "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; fi
    [ -e /run/netns/$NODE ] && in_node "$BIN/sluiced" --cleanup --socket "$SOCK" --state-dir "$WORK/state" --bpffs "$BPFFS" 2>/dev/null
    ip netns del $NODE 2>/dev/null; ip netns del $EXT 2>/dev/null
    jobs -p | xargs -r kill 2>/dev/null
    rm -rf "$WORK"
    echo "removed namespaces, pins under $BPFFS and $WORK"
}
trap cleanup EXIT
cleanup >/dev/null 2>&1   # leftovers of an interrupted run

step "a node: namespace $NODE with an uplink to an external host ($EXT)"
mkdir -p "$WORK/net.d"
ip netns add $NODE; ip netns add $EXT
ip -n $NODE link set lo up; ip -n $EXT link set lo up
ip -n $NODE link add uplink type veth peer name eth0 netns $EXT
ip -n $NODE addr add 192.168.200.1/24 dev uplink; ip -n $NODE link set uplink up
ip -n $EXT addr add 192.168.200.2/24 dev eth0; ip -n $EXT link set eth0 up
ip -n $EXT route add 10.244.0.0/24 via 192.168.200.1
echo "node 192.168.200.1 <-> external host 192.168.200.2"

step "sluiced in the node namespace"
nsenter --net=/run/netns/$NODE -- "$BIN/sluiced" --socket "$SOCK" --state-dir "$WORK/state" --bpffs "$BPFFS" \
    --node-name demo-node --pod-cidr 10.244.0.0/24 2>"$WORK/sluiced.log" &
DAEMON_PID=$!
for _ in $(seq 100); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
ctl status >/dev/null || { cat "$WORK/sluiced.log"; exit 1; }
cat > "$WORK/net.d/10-sluice.conflist" <<CONF
{"cniVersion":"1.0.0","name":"sluice","plugins":[{"type":"sluice","socket":"$SOCK","mtu":1500}]}
CONF
echo "CNI config: $(cat "$WORK/net.d/10-sluice.conflist")"

step "three pods, added with cnitool and the sluice plugin"
declare -A IP
for p in "${PODS[@]}"; do
    ip netns add $p
    echo "\$ cnitool add sluice /run/netns/$p"
    out=$(cni add sluice /run/netns/$p)
    echo "$out"
    IP[$p]=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
done
echo; for p in "${PODS[@]}"; do echo "$p: ${IP[$p]}"; done

step "pod-to-pod TCP: pod1 -> pod2:8080 (the server prints who connected)"
in_pod ${PODS[1]} python3 -c '
import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0",8080)); s.listen(1)
c,a=s.accept(); print("  pod2 server: connection from", a[0]); c.sendall(b"hello from pod2\n"); c.close()' &
sleep 0.5
echo "  pod1 client got: $(in_pod ${PODS[0]} nc -N ${IP[${PODS[1]}]} 8080 </dev/null)"
wait %% 2>/dev/null || true

step "node -> pod and external host -> pod"
in_node ping -c 2 -W 1 ${IP[${PODS[2]}]} | sed 's/^/  /' | tail -2
nsenter --net=/run/netns/$EXT ping -c 2 -W 1 ${IP[${PODS[0]}]} | sed 's/^/  /' | tail -2

step "a ClusterIP Service: web (10.96.0.10:80) -> pod2:8080, pod3:8080 (targetPort by name)"
cat > "$WORK/web.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [${IP[${PODS[1]}]}], conditions: {ready: true}}
- {addresses: [${IP[${PODS[2]}]}], conditions: {ready: true}}
YAML
echo "\$ sluicectl apply -f web.yaml"
ctl apply -f "$WORK/web.yaml"
# Each backend prints the client address it sees, and answers with its own.
for p in ${PODS[1]} ${PODS[2]}; do
    in_pod $p python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 8080)); s.listen(16)
while True:
    c, a = s.accept(); me = c.getsockname()[0]
    print("  backend %s: connection from %s" % (me, a[0]), flush=True)
    c.sendall(("hello from %s, you are %s\n" % (me, a[0])).encode()); c.close()' &
done
sleep 0.7
echo "pod1 (${IP[${PODS[0]}]}) connects to 10.96.0.10:80 six times:"
for i in 1 2 3 4 5 6; do
    echo "  pod1 got: $(in_pod ${PODS[0]} nc -N 10.96.0.10 80 </dev/null)"
    sleep 0.1
done
echo "(no SNAT: every backend saw the client pod's own IP ${IP[${PODS[0]}]})"

step "a Service without endpoints is refused at once (not a timeout)"
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: demo}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n' | ctl apply -f -
in_pod ${PODS[0]} python3 -c '
import socket, time
t = time.time()
try: socket.create_connection(("10.96.0.11", 80), 5)
except ConnectionRefusedError: print("  pod1 -> 10.96.0.11:80: connection refused after %.1f ms" % ((time.time() - t) * 1000))'

step "sluicectl get services"
ctl get services
step "sluicectl get endpoints"
ctl get endpoints
step "sluicectl get conntrack"
ctl get conntrack

step "sluicectl status: attachments, per-pod counters, programs, packet outcomes"
ctl status

step "done"
