#!/usr/bin/env bash
# README command 1: set up a fresh Debian 12 machine (as root), build sluice, and run a two-node
# cluster in network namespaces (the host's real interfaces are never touched):
#
#   fabric netns: a Linux bridge joining node A (192.168.77.1), node B (192.168.77.2) and an
#   external client (192.168.77.100); sluiced on each node; pods added with the real plugin
#   through cnitool (A: 10.244.1.0/24, B: 10.244.2.0/24).
#
# It shows pods across nodes, a ClusterIP Service whose backends see the client pod's own IP, and
# then, side by side, a NodePort on node A to a backend pod on node B
#   (a) the kube-proxy way (iptables rules as kube-proxy's iptables mode writes them): the backend
#       sees node A's address, and the reply goes back through A;
#   (b) sluice's way (DSR): the backend sees the external client's address, and the reply leaves
#       node B straight to the client, with A's address and the node port as its source.
# Everything is removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

bash scripts/install-deps.sh
echo "== building sluice"
cargo build --release --locked
BIN=$ROOT/target/release
T0=$(date +%s)

P=sluice-demo
FABRIC=$P-fabric
CLIENT=$P-client
NODES=(a b)
declare -A NS=([a]=$P-node-a [b]=$P-node-b)
declare -A NODE_IP=([a]=192.168.77.1 [b]=192.168.77.2)
declare -A CIDR=([a]=10.244.1.0/24 [b]=10.244.2.0/24)
CLIENT_IP=192.168.77.100
WORK=/tmp/sluice-demo
declare -A PID=()
PODS=()   # "node:netns"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/$ns -- "$@"; }
sock() { echo "$WORK/$1/sluiced.sock"; }
bpffs() { echo "/sys/fs/bpf/sluice-demo-$1"; }
daemon_args() { echo --socket "$(sock $1)" --state-dir "$WORK/$1/state" --bpffs "$(bpffs $1)" \
    --node-name node-$1 --pod-cidr ${CIDR[$1]} --nodeport-iface fabric0 --node-ip ${NODE_IP[$1]}; }
ctl() { local n=$1; shift; in_ns ${NS[$n]} "$BIN/sluicectl" --socket "$(sock $n)" "$@"; }
cni() { local n=$1; shift; in_ns ${NS[$n]} env CNI_PATH="$BIN:/usr/lib/cni" NETCONFPATH="$WORK/$n/net.d" cnitool "$@"; }

cleanup() {
    set +e
    step "cleaning up"
    for entry in "${PODS[@]}"; do
        n=${entry%%:*}; p=${entry#*:}
        [ -e /run/netns/$p ] || continue
        ip netns pids $p | xargs -r kill 2>/dev/null   # the demo's servers inside the pod
        cni $n del sluice /run/netns/$p 2>/dev/null
        ip netns del $p 2>/dev/null
    done
    for n in "${NODES[@]}"; do
        if [ -n "${PID[$n]:-}" ]; then kill -TERM "${PID[$n]}" 2>/dev/null; wait "${PID[$n]}" 2>/dev/null; fi
        if [ -e /run/netns/${NS[$n]} ]; then
            ip netns pids ${NS[$n]} | xargs -r kill 2>/dev/null
            in_ns ${NS[$n]} "$BIN/sluiced" --cleanup $(daemon_args $n) 2>/dev/null
        fi
        rm -rf "$(bpffs $n)"
    done
    for ns in $FABRIC $CLIENT; do
        [ -e /run/netns/$ns ] && ip netns pids $ns | xargs -r kill 2>/dev/null
    done
    jobs -p | xargs -r kill 2>/dev/null
    for ns in ${NS[a]} ${NS[b]} $FABRIC $CLIENT; do ip netns del $ns 2>/dev/null; done
    ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" | xargs -r -n1 ip netns del 2>/dev/null
    rm -rf "$WORK"
    echo "removed namespaces, pins under /sys/fs/bpf/sluice-demo-*, and $WORK"
}
trap cleanup EXIT
cleanup >/dev/null 2>&1   # leftovers of an interrupted run

# ------------------------------------------------------------------------------------------------
step "the fabric: a bridge joining node A, node B and an external client (MTU 1500)"
mkdir -p "$WORK"
ip netns add $FABRIC; ip -n $FABRIC link set lo up
ip -n $FABRIC link add br0 type bridge stp_state 0 forward_delay 0
ip -n $FABRIC link set br0 up
plug() {   # plug NETNS PORT-NAME ADDRESS IFNAME
    ip netns add $1; ip -n $1 link set lo up
    ip -n $FABRIC link add $2 mtu 1500 type veth peer name $4 mtu 1500 netns $1
    ip -n $FABRIC link set $2 master br0 up
    ip -n $1 addr add $3/24 dev $4; ip -n $1 link set $4 up
}
plug ${NS[a]} port-a ${NODE_IP[a]} fabric0
plug ${NS[b]} port-b ${NODE_IP[b]} fabric0
plug $CLIENT port-client $CLIENT_IP eth0
note "node A ${NODE_IP[a]}  pods ${CIDR[a]}   (netns ${NS[a]}, link fabric0 = bridge port port-a)"
note "node B ${NODE_IP[b]}  pods ${CIDR[b]}   (netns ${NS[b]}, link fabric0 = bridge port port-b)"
note "client $CLIENT_IP (netns $CLIENT): routes to nothing but the fabric, no route to pod CIDRs"

# The cluster's Node objects (name, podCIDR, InternalIP): each node routes the other's pod CIDR
# via the other's address. Given to sluiced as a manifest (standalone mode).
for n in "${NODES[@]}"; do
    mkdir -p "$WORK/$n/net.d" "$WORK/$n/manifests"
    for m in "${NODES[@]}"; do
        cat >> "$WORK/$n/manifests/nodes.yaml" <<YAML
---
apiVersion: v1
kind: Node
metadata: {name: node-$m}
spec: {podCIDR: ${CIDR[$m]}}
status: {addresses: [{type: InternalIP, address: ${NODE_IP[$m]}}]}
YAML
    done
    cat > "$WORK/$n/net.d/10-sluice.conflist" <<CONF
{"cniVersion":"1.0.0","name":"sluice","plugins":[{"type":"sluice","socket":"$(sock $n)","mtu":1500}]}
CONF
done

step "sluiced on each node (DSR mode, the default), with the Node objects"
for n in "${NODES[@]}"; do
    echo "\$ sluiced $(daemon_args $n) --manifests $WORK/$n/manifests" | sed "s|$WORK|\$WORK|g"
    # nsenter execs sluiced: $! is the daemon itself (SIGTERM at cleanup reaches it).
    nsenter --net=/run/netns/${NS[$n]} -- "$BIN/sluiced" $(daemon_args $n) --manifests "$WORK/$n/manifests" 2>"$WORK/$n/sluiced.log" &
    PID[$n]=$!
done
for n in "${NODES[@]}"; do
    for _ in $(seq 100); do ctl $n status >/dev/null 2>&1 && break; sleep 0.1; done
    ctl $n status >/dev/null || { cat "$WORK/$n/sluiced.log"; exit 1; }
done
other() { [ $1 = a ] && echo b || echo a; }
for n in "${NODES[@]}"; do
    o=$(other $n)
    for _ in $(seq 50); do ip -n ${NS[$n]} route show proto 197 | grep -q "${CIDR[$o]} via" && break; sleep 0.1; done
    note "node $n: $(ip -n ${NS[$n]} route show proto 197 | grep "${CIDR[$o]}" || echo "NO ROUTE to ${CIDR[$o]} (sluiced did not apply the Node objects)")"
done

# ------------------------------------------------------------------------------------------------
step "pods, added with cnitool and the sluice plugin"
declare -A IP
addpod() {   # addpod NODE NAME
    local ns=$P-$1-$2
    ip netns add $ns
    PODS+=("$1:$ns")
    local out; out=$(cni $1 add sluice /run/netns/$ns)
    IP[$2]=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
    note "node $1: pod $2 = ${IP[$2]}   (\$ cnitool add sluice /run/netns/$ns)"
}
addpod a client-pod
addpod a web-a
addpod b web-b
in_pod() { local p=$1; shift; in_ns $P-$p "$@"; }

# Every backend answers with what it saw: "backend <its IP> saw client <peer address>".
for pod in a-web-a b-web-b; do
    nsenter --net=/run/netns/$P-$pod -- python3 -c '
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 8080)); s.listen(64)
def serve(c, a):
    c.recv(100); c.sendall(("backend %s saw client %s\n" % (c.getsockname()[0], a[0])).encode()); c.close()
while True:
    c, a = s.accept(); threading.Thread(target=serve, args=(c, a), daemon=True).start()' &
done
ask() {   # ask NETNS ADDR PORT: one request, prints the backend's answer
    in_ns $1 python3 -c '
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3); c.sendall(b"hi\n")
    print(c.makefile().readline().strip())
except OSError as e:
    print("FAILED: %s" % e)' "$2" "$3"
}
sleep 0.5

step "pod to pod across nodes: client-pod (node A) -> web-b (node B) :8080, no NAT"
note "$(ask $P-a-client-pod ${IP[web-b]} 8080)"

step "a ClusterIP Service: web 10.96.0.10:80 -> web-a (node A), web-b (node B)"
web_yaml() {
    cat <<YAML
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [${IP[web-a]}], nodeName: node-a, conditions: {ready: true}}
- {addresses: [${IP[web-b]}], nodeName: node-b, conditions: {ready: true}}
YAML
}
web_yaml > "$WORK/web.yaml"
for n in "${NODES[@]}"; do ctl $n apply -f "$WORK/web.yaml" >/dev/null; done
echo "\$ sluicectl apply -f web.yaml   (on both nodes)"
echo "client-pod (${IP[client-pod]}) connects to 10.96.0.10:80 four times:"
for _ in 1 2 3 4; do note "$(ask $P-a-client-pod 10.96.0.10 80)"; done
note "(no SNAT: every backend saw the client pod's own IP ${IP[client-pod]})"

# ------------------------------------------------------------------------------------------------
# Captures: tcpdump on the bridge ports, frames each node sent into the fabric (-Q in on the
# bridge side of its link). Quick mode (-q) so VXLAN shows as the outer packet that crossed.
cap_start() {
    rm -f "$WORK"/cap-*.txt
    for n in "${NODES[@]}"; do
        nsenter --net=/run/netns/$FABRIC -- tcpdump -nn -q -l -i port-$n -Q in "ip and (host $CLIENT_IP or udp port 4789 or net 10.244.0.0/16)" \
            >"$WORK/cap-$n.txt" 2>"$WORK/cap-$n.err" &
        echo $! >"$WORK/cap-$n.pid"
    done
    for n in "${NODES[@]}"; do
        for _ in $(seq 100); do grep -q "listening on" "$WORK/cap-$n.err" 2>/dev/null && break; sleep 0.05; done
    done
}
cap_stop() {
    sleep 0.3
    for n in "${NODES[@]}"; do kill -INT "$(cat "$WORK/cap-$n.pid")" 2>/dev/null || true; done
    for n in "${NODES[@]}"; do wait "$(cat "$WORK/cap-$n.pid")" 2>/dev/null || true; done
    sed -i '/^$/d' "$WORK"/cap-*.txt
    for n in "${NODES[@]}"; do
        N=$(echo $n | tr ab AB)
        echo "   frames node $N sent into the fabric (tcpdump -Q in on its bridge port):"
        sed -e 's/^[0-9:.]* IP /      /' -e 's/\.4789: UDP/.4789: UDP (VXLAN)/' "$WORK/cap-$n.txt" | head -8
        [ "$(wc -l < "$WORK/cap-$n.txt")" -gt 8 ] && echo "      ..."
        printf '      \033[1m= node %s sent %d packets to the client, %d VXLAN packets, %d other\033[0m\n' $N \
            "$(sent_to_client $n)" "$(grep -c '\.4789: UDP' "$WORK/cap-$n.txt")" \
            "$(grep -v '\.4789: UDP' "$WORK/cap-$n.txt" | grep -vc "> $CLIENT_IP\.")"
    done
}
# Plain (not encapsulated) packets node $1 sent to the client during the last capture.
sent_to_client() { grep -v '\.4789: UDP' "$WORK/cap-$1.txt" | grep -c "> $CLIENT_IP\." || true; }
FAILED=()
expect() { if eval "$2"; then note "ok: $1"; else note "NOT AS EXPECTED: $1"; FAILED+=("$1"); fi; }

step "(a) kube-proxy's way: iptables NodePort ${NODE_IP[a]}:30180 on node A -> web-b on node B"
# Rules as kube-proxy's iptables mode writes them, chain names hashed the same way.
kp_hash() { python3 -c 'import base64,hashlib,sys; print(base64.b32encode(hashlib.sha256(sys.argv[1].encode()).digest()).decode()[:16])' "$1"; }
SVC_CHAIN=KUBE-SVC-$(kp_hash "demo/web-kp:httptcp")
SEP_CHAIN=KUBE-SEP-$(kp_hash "demo/web-kp:httptcp${IP[web-b]}:8080")
cat > "$WORK/kube-proxy.rules" <<RULES
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:$SVC_CHAIN - [0:0]
:$SEP_CHAIN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-NODEPORTS -p tcp -m comment --comment "demo/web-kp:http" -m tcp --dport 30180 -j KUBE-MARK-MASQ
-A KUBE-NODEPORTS -p tcp -m comment --comment "demo/web-kp:http" -m tcp --dport 30180 -j $SVC_CHAIN
-A KUBE-SERVICES -d 10.96.0.50/32 -p tcp -m comment --comment "demo/web-kp:http cluster IP" -m tcp --dport 80 -j $SVC_CHAIN
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A $SVC_CHAIN ! -s 10.244.0.0/16 -d 10.96.0.50/32 -p tcp -m comment --comment "demo/web-kp:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A $SVC_CHAIN -m comment --comment "demo/web-kp:http -> ${IP[web-b]}:8080" -j $SEP_CHAIN
-A $SEP_CHAIN -s ${IP[web-b]}/32 -m comment --comment "demo/web-kp:http" -j KUBE-MARK-MASQ
-A $SEP_CHAIN -p tcp -m comment --comment "demo/web-kp:http" -m tcp -j DNAT --to-destination ${IP[web-b]}:8080
COMMIT
RULES
in_ns ${NS[a]} iptables-restore -w --noflush < "$WORK/kube-proxy.rules"
echo "\$ iptables-save -t nat   (node A; sluice does not serve port 30180)"
in_ns ${NS[a]} iptables-save -t nat | grep -E '^-A (KUBE|PREROUTING|OUTPUT|POSTROUTING)' | sed 's/^/   /'
echo
echo "client ($CLIENT_IP) -> ${NODE_IP[a]}:30180:"
cap_start
KP_LINE=$(ask $CLIENT ${NODE_IP[a]} 30180)
cap_stop
echo
printf '   \033[1m%s\033[0m\n' "$KP_LINE"
note "-> SNAT: the backend saw node A's address, not the client's; web-b's reply went back to A,"
note "   which un-NATed it and sent it on to the client."
expect "kube-proxy: backend saw node A's address" '[[ "$KP_LINE" == *"saw client ${NODE_IP[a]}" ]]'
expect "kube-proxy: the reply to the client left node A" '[ "$(sent_to_client a)" -gt 0 ]' 

step "(b) sluice's way: NodePort ${NODE_IP[a]}:30080 on node A -> web-b on node B (DSR)"
cat > "$WORK/web-np.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-np-1, namespace: demo, labels: {kubernetes.io/service-name: web-np}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [${IP[web-b]}], nodeName: node-b, conditions: {ready: true}}
YAML
for n in "${NODES[@]}"; do ctl $n apply -f "$WORK/web-np.yaml" >/dev/null; done
echo "\$ sluicectl apply -f web-np.yaml   (type NodePort, nodePort 30080, endpoint on node-b; on both nodes)"
echo
echo "client ($CLIENT_IP) -> ${NODE_IP[a]}:30080:"
cap_start
SL_LINE=$(ask $CLIENT ${NODE_IP[a]} 30080)
cap_stop
echo
printf '   \033[1m%s\033[0m\n' "$SL_LINE"
if [[ "$SL_LINE" == *"saw client $CLIENT_IP" ]]; then
    note "-> no SNAT: the backend saw the external client's own address. Node A only encapsulated the"
    note "   client's packets (VXLAN to B); node B answered the client directly, from ${NODE_IP[a]}:30080."
fi
expect "sluice: backend saw client $CLIENT_IP" '[[ "$SL_LINE" == *"saw client $CLIENT_IP" ]]'
expect "sluice: no reply to the client left node A" '[ "$(sent_to_client a)" -eq 0 ]'
expect "sluice: the replies left node B, from ${NODE_IP[a]}:30080" \
    'grep -v "\.4789: UDP" "$WORK/cap-b.txt" | grep -q "${NODE_IP[a]}\.30080 > $CLIENT_IP\."' 
echo
for n in "${NODES[@]}"; do
    echo "\$ sluicectl get services   (node $n)"
    ctl $n get services | sed 's/^/   /'
done

step "side by side"
printf '   %-34s %s\n' "kube-proxy (iptables, SNAT):" "$KP_LINE"
printf '   %-34s %s\n' "sluice (BPF, DSR):" "$SL_LINE"

step "sluicectl status (node B)"
ctl b status | sed 's/^/   /'

if [ ${#FAILED[@]} -gt 0 ]; then
    step "FAILED after $(( $(date +%s) - T0 )) s:"
    printf '   - %s\n' "${FAILED[@]}"
    for n in "${NODES[@]}"; do echo "--- sluiced.log (node $n)"; tail -20 "$WORK/$n/sluiced.log"; done
    exit 1
fi
step "done in $(( $(date +%s) - T0 )) s after the build"
