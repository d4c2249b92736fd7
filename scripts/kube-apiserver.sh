#!/usr/bin/env bash
# A real kube-apiserver (1.20.2, built from Debian's `kubernetes` source package, offline) and
# etcd (Debian's etcd-server 3.4.23) on 127.0.0.1, for sluice's tests. See
# shared/reference/kubernetes-watch.md (§1.1) for the recipe this follows.
#
#   kube-apiserver.sh build
#       Ensures $CACHE/{kube-apiserver,etcd,kubectl} exist; builds kube-apiserver only when it is
#       missing (cold: ~6.5 min on 2 cores). Needs root (apt, /var/cache).
#   kube-apiserver.sh start DIR [EXTRA KUBE-APISERVER FLAGS...]
#       Starts etcd and kube-apiserver with their state, logs and pids in DIR, on free ports of
#       127.0.0.1, TLS (own CA) + a random bearer token (system:masters), RBAC authorization.
#       Returns once /readyz answers ok. Writes DIR/kubeconfig (kube-rs and kubectl), DIR/url,
#       DIR/token, DIR/ca.crt, DIR/env (shell: KUBECONFIG, KUBE_URL, KUBE_TOKEN, KUBECTL).
#       Extra flags go to kube-apiserver after the defaults, so they override scalar defaults
#       (e.g. `--watch-cache=false --etcd-compaction-interval=5s`; another --feature-gates adds
#       gates). With $KUBE_APISERVER_OWNER_PID set, a watchdog stops both processes when that
#       process exits (a killed test run leaves nothing running).
#   kube-apiserver.sh stop DIR
#       Stops what `start DIR` started (SIGKILL: test state, nothing to keep). Idempotent; DIR
#       itself is left to the caller.
#   kube-apiserver.sh stop-apiserver DIR / start-apiserver DIR
#       Stops only kube-apiserver (SIGTERM; SIGNAL=KILL for a crash) and starts it again with
#       the same port, certificates, token, flags and etcd: the kubeconfig stays valid and the
#       objects stay (for "API server away, then back" tests).
#
# Cold build, measured on this project's 2-core Debian 12 VM (2025-12-01), `build` from nothing
# in the cache, Go toolchain already installed: 6 min 30 s wall (7 min 57 s user CPU) with the
# machine otherwise mostly idle; 23 min wall (9 min 30 s user) while other engineers' cargo
# builds ran at normal priority (the Go build runs at nice 10). Of that, apt + downloads take
# ~20 s; `make WHAT=cmd/kube-apiserver` the rest. Cached afterwards: `build` returns at once.
# `start`: /readyz ok ~6 s after launch on an idle machine, 8-14 s with four servers starting
# at once next to other builds.
#
# Nothing is installed system-wide besides build tools: etcd and kubectl are unpacked from their
# Debian packages into the cache (installing etcd-server would start a system etcd on :2379, and
# Debian's kubernetes-client would clash with an installed /usr/bin/kubectl).
#
set -euo pipefail

VERSION=1.20.2
CACHE=${SLUICE_KUBE_CACHE:-/var/cache/sluice/kube-apiserver-$VERSION}
APISERVER=$CACHE/kube-apiserver
ETCD=$CACHE/etcd
KUBECTL=$CACHE/kubectl
APT=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
# Build and run tools. etcd-server and kubernetes-client are fetched with `apt-get download`.
PKGS=(golang-go rsync openssl dpkg-dev make curl iproute2 util-linux procps ca-certificates)
FEATURE_GATES=IPv6DualStack=true,EndpointSliceTerminatingCondition=true,EndpointSliceNodeName=true

say() { echo "kube-apiserver.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

have_all() { [ -x "$APISERVER" ] && [ -x "$ETCD" ] && [ -x "$KUBECTL" ]; }

install_pkgs() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${APT[@]}" update
    "${APT[@]}" install --no-install-recommends "${missing[@]}"
  fi
}

# deb-src from the machine's own entry (never a hard-coded mirror), as install-deps.sh does.
enable_deb_src() {
  if grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ || grep -qs '^deb-src' /etc/apt/sources.list; then
    return
  fi
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/sluice-deb-src.sources
  elif [ -f /etc/apt/sources.list ]; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/sluice-deb-src.list
  else
    die "no apt source to derive a deb-src entry from"
  fi
  "${APT[@]}" update
}

# apt-get download/source fetch as the _apt user: let it write into DIR.
apt_dir() { chmod 755 "$1"; chown _apt "$1" 2>/dev/null || true; }

# Unpacks one file of a Debian binary package into the cache (atomically: temp name + rename).
unpack_from_deb() { # PACKAGE PATH-IN-PACKAGE DEST
  local pkg=$1 inpkg=$2 dest=$3 t
  t=$(mktemp -d /tmp/sluice-kube-deb.XXXXXX)
  apt_dir "$t"
  ( cd "$t" && apt-get download -q "$pkg" >/dev/null && dpkg -x ./*.deb x ) || { rm -rf "$t"; die "apt-get download $pkg failed"; }
  install -m 0755 "$t/x/$inpkg" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
  rm -rf "$t"
  say "$(basename "$dest") from Debian's $pkg: $dest"
}

build_apiserver() {
  local work t0 src
  t0=$(date +%s)
  work=$(mktemp -d /tmp/sluice-kube-build.XXXXXX)
  apt_dir "$work"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  say "building kube-apiserver $VERSION from Debian's source package in $work (cold: ~6-7 min)"
  cd "$work"
  apt-get source -q --download-only kubernetes >/dev/null
  src=$(ls kubernetes_*.orig.tar.gz)
  case "$src" in *"really$VERSION"*) ;; *) die "Debian's kubernetes source is $src, not $VERSION" ;; esac
  tar xzf "$src"
  cd "kubernetes-$VERSION"
  # The Debian patches (debian/patches) only touch kubectl; the apiserver is built from upstream.
  # reflect2: the vendored v1.0.1 segfaults with Go >= 1.18 (UnsafeIterate) the first time a map
  # is JSON-encoded; Debian's 1.0.2 is the fix.
  ( cd "$work" && apt-get download -q golang-github-modern-go-reflect2-dev >/dev/null \
      && dpkg -x golang-github-modern-go-reflect2-dev_*.deb reflect2 )
  [ -f "$work/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/reflect2.go" ] \
    || die "reflect2 1.0.2 not where expected in golang-github-modern-go-reflect2-dev"
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r "$work/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2" vendor/github.com/modern-go/
  # The same GOPATH layout as debian/rules.
  mkdir -p .go/src/k8s.io
  ln -sfn ../../.. .go/src/k8s.io/kubernetes
  GOPATH=$PWD/.go GOPROXY=off CGO_ENABLED=0 GOCACHE="$work/gocache" \
    nice -n 10 make WHAT=cmd/kube-apiserver >"$work/make.log" 2>&1 \
    || { tail -n 60 "$work/make.log" >&2; die "make WHAT=cmd/kube-apiserver failed"; }
  local out=_output/local/bin/linux/amd64/kube-apiserver
  [ -x "$out" ] || die "make succeeded but $out is missing"
  "$out" --version | grep -q "v$VERSION" || die "built $("$out" --version), expected v$VERSION"
  install -m 0755 "$out" "$APISERVER.tmp.$$"
  cd /
  rm -rf "$work"
  trap - EXIT
  smoke_test "$APISERVER.tmp.$$"
  mv -f "$APISERVER.tmp.$$" "$APISERVER"
  say "built $APISERVER in $(( $(date +%s) - t0 ))s"
}

# A fresh build must serve a real request (the reflect2 break only shows when encoding a map).
smoke_test() { # BINARY
  local d rc
  d=$(mktemp -d /tmp/sluice-kube-smoke.XXXXXX)
  set +e
  (
    set -e
    APISERVER_BIN=$1 run_in "$d" >/dev/null
    curl -sSf --cacert "$d/ca.crt" -H "@$d/auth-header" "$(cat "$d/url")/api/v1/namespaces/kube-system" >/dev/null
  )
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then
    tail -n 30 "$d/kube-apiserver.log" >&2 || true
    stop_servers "$d"; rm -rf "$d"; rm -f "$1"
    die "the freshly built kube-apiserver failed its smoke test"
  fi
  stop_servers "$d"
  rm -rf "$d"
  say "smoke test passed"
}

cmd_build() {
  if [ "$(id -u)" = 0 ]; then
    install_pkgs # the tools `start` needs, also when the binaries are cached
  elif ! have_all; then
    die "building needs root (apt, $CACHE); run: sudo bash $0 build"
  fi
  if have_all; then
    "$APISERVER" --version | grep -q "v$VERSION" || die "$APISERVER is not v$VERSION: remove it and build again"
    say "ok: $APISERVER ($("$APISERVER" --version)), $ETCD, $KUBECTL"
    return
  fi
  mkdir -p "$CACHE"
  # One build at a time on this machine (several test runs may call build at once).
  exec 9>"$CACHE/.lock"
  flock 9
  have_all && { say "ok (built by a concurrent run)"; return; }
  [ -x "$ETCD" ] || unpack_from_deb etcd-server usr/bin/etcd "$ETCD"
  [ -x "$KUBECTL" ] || unpack_from_deb kubernetes-client usr/bin/kubectl "$KUBECTL"
  if [ ! -x "$APISERVER" ]; then
    enable_deb_src
    (build_apiserver)
  fi
  have_all || die "build finished but $CACHE is incomplete"
  say "ok: $APISERVER, $ETCD, $KUBECTL"
}

# A port of 127.0.0.1 nobody listens on, below the ephemeral range (outgoing connections and
# bind(0) never take it) and not in $taken. Races with a concurrent start are caught by the bind
# failing, and start retries with new ports.
taken=" "
pick_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 12000 ))
    case "$taken" in *" $p "*) continue ;; esac
    if [ -z "$(ss -Htln "sport = :$p")" ]; then
      taken="$taken$p "
      echo "$p"
      return
    fi
  done
}

# A process that runs (a zombie does not: its parent may be slow to reap it).
alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local st
  st=$(sed 's/^.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$st" != Z ] && [ "$st" != X ]
}

# Stops the process in DIR/NAME.pid if it is still the one we started (its command line names
# DIR): SIGNAL (default TERM), then SIGKILL after 10 s.
stop_pidfile() { # DIR NAME [SIGNAL]
  local f=$1/$2.pid sig=${3:-TERM} pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1"; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 200); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

# Teardown: SIGKILL (throwaway test state, nothing to flush; a graceful apiserver shutdown takes
# seconds). The watchdog first, so it does not act on a half-stopped server.
stop_servers() { # DIR
  stop_pidfile "$1" watchdog KILL
  stop_pidfile "$1" kube-apiserver KILL
  stop_pidfile "$1" etcd KILL
}

gen_certs() { # DIR
  local d=$1
  mkdir -p "$d/pki"
  (
    cd "$d/pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt \
      -days 3650 -subj "/CN=sluice-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
      >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
  cp "$d/pki/ca.crt" "$d/ca.crt"
}

write_kubeconfig() { # DIR URL TOKEN
  local d=$1 url=$2 token=$3 ca
  ca=$(base64 -w0 <"$d/ca.crt")
  cat >"$d/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: $url
    certificate-authority-data: $ca
users:
- name: sluice-test-admin
  user:
    token: $token
contexts:
- name: sluice-test
  context:
    cluster: sluice-test
    user: sluice-test-admin
    namespace: default
current-context: sluice-test
preferences: {}
EOF
  chmod 600 "$d/kubeconfig.tmp"
  mv -f "$d/kubeconfig.tmp" "$d/kubeconfig"
}

# Waits until $2 (curl args) answers "ok", or the process in DIR/$1.pid dies, or $3 seconds pass.
wait_ok() { # DIR NAME TIMEOUT URL [CURL ARGS...]
  local d=$1 name=$2 timeout=$3 url=$4 deadline
  shift 4
  deadline=$(( $(date +%s) + timeout ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    alive "$(cat "$d/$name.pid")" || return 2
    case "$(curl -sS --max-time 2 "$@" "$url" 2>/dev/null)" in
      ok|*'"health":"true"'*) return 0 ;;
    esac
    sleep 0.2
  done
  return 1
}

# Starts kube-apiserver on DIR's ports with the flags saved in DIR/apiserver.flags; waits for
# /readyz. Returns 2 when the process died (e.g. port taken), 1 on timeout.
launch_apiserver() { # DIR
  local d=$1 client port rc=0 flags=()
  local bin=${APISERVER_BIN:-$APISERVER}
  read -r client _ port <"$d/ports"
  if [ -s "$d/apiserver.flags" ]; then mapfile -d '' -t flags <"$d/apiserver.flags"; fi
  "$bin" --etcd-servers="http://127.0.0.1:$client" \
    --insecure-port=0 --secure-port="$port" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --tls-cert-file="$d/pki/apiserver.crt" --tls-private-key-file="$d/pki/apiserver.key" \
    --client-ca-file="$d/pki/ca.crt" \
    --token-auth-file="$d/tokens.csv" --authorization-mode=Node,RBAC --allow-privileged=true \
    --disable-admission-plugins=ServiceAccount \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$d/pki/sa.pub" \
    --service-account-signing-key-file="$d/pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/108 \
    --feature-gates="$FEATURE_GATES" \
    --profiling=false \
    "${flags[@]}" \
    </dev/null >>"$d/kube-apiserver.log" 2>&1 &
  echo $! >"$d/kube-apiserver.pid"
  wait_ok "$d" kube-apiserver 120 "https://127.0.0.1:$port/readyz" --cacert "$d/ca.crt" -H "@$d/auth-header" || rc=$?
  return "$rc"
}

start_servers() { # DIR [FLAGS...]
  local d=$1 client peer port rc
  shift
  : >"$d/apiserver.flags"
  if [ $# -gt 0 ]; then printf '%s\0' "$@" >"$d/apiserver.flags"; fi
  for _ in 1 2 3 4 5; do
    taken=" "
    client=$(pick_port); peer=$(pick_port); port=$(pick_port)
    echo "$client $peer $port" >"$d/ports"
    rm -rf "$d/etcd-data"
    : >"$d/kube-apiserver.log"
    # etcd: data in DIR, no fsync (test data), logs to DIR/etcd.log.
    "$ETCD" --name sluice-test --data-dir "$d/etcd-data" \
      --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "sluice-test=http://127.0.0.1:$peer" --unsafe-no-fsync \
      </dev/null >"$d/etcd.log" 2>&1 &
    echo $! >"$d/etcd.pid"
    rc=0; wait_ok "$d" etcd 30 "http://127.0.0.1:$client/health" || rc=$?
    if [ "$rc" != 0 ]; then
      stop_pidfile "$d" etcd KILL
      if grep -q "address already in use" "$d/etcd.log"; then continue; fi
      tail -n 20 "$d/etcd.log" >&2
      die "etcd did not become healthy (log: $d/etcd.log)"
    fi
    rc=0; launch_apiserver "$d" || rc=$?
    if [ "$rc" = 0 ]; then
      echo "https://127.0.0.1:$port" >"$d/url"
      return 0
    fi
    stop_pidfile "$d" kube-apiserver
    stop_pidfile "$d" etcd KILL
    if [ "$rc" = 2 ] && grep -q "address already in use" "$d/kube-apiserver.log"; then continue; fi
    tail -n 30 "$d/kube-apiserver.log" >&2
    die "kube-apiserver did not become ready ($([ "$rc" = 2 ] && echo exited || echo timeout); log: $d/kube-apiserver.log)"
  done
  die "no free ports after 5 attempts"
}

# Prepares DIR (certs, token) and starts etcd + kube-apiserver in it (binary: $APISERVER_BIN).
run_in() { # DIR [FLAGS...]
  local d=$1 token
  shift
  mkdir -p "$d"
  d=$(cd "$d" && pwd)
  [ ! -f "$d/kube-apiserver.pid" ] || die "$d already has a kube-apiserver (stop it first)"
  token=$(openssl rand -hex 24)
  gen_certs "$d"
  echo "$token,sluice-test-admin,sluice-test-admin,system:masters" >"$d/tokens.csv"
  echo "$token" >"$d/token"
  printf 'Authorization: Bearer %s\n' "$token" >"$d/auth-header"
  chmod 600 "$d/tokens.csv" "$d/token" "$d/auth-header"
  start_servers "$d" "$@"
  write_kubeconfig "$d" "$(cat "$d/url")" "$token"
  cat >"$d/env" <<EOF
KUBECONFIG=$d/kubeconfig
KUBE_URL=$(cat "$d/url")
KUBE_TOKEN=$token
KUBE_CA=$d/ca.crt
KUBECTL=$KUBECTL
EOF
}

cmd_start() {
  [ $# -ge 1 ] || die "usage: $0 start DIR [EXTRA KUBE-APISERVER FLAGS...]"
  local d=$1 t0 t
  shift
  t0=$(date +%s%N)
  have_all || die "kube-apiserver $VERSION, etcd or kubectl missing in $CACHE: run \`sudo bash $0 build\` first (scripts/test.sh does; ~6-7 min cold)"
  for t in openssl curl ss base64 flock; do
    command -v "$t" >/dev/null || die "$t not found: run \`sudo bash $0 build\` (it installs the tools)"
  done
  mkdir -p "$d"
  d=$(cd "$d" && pwd)
  run_in "$d" "$@"
  if [ -n "${KUBE_APISERVER_OWNER_PID:-}" ]; then
    # Stops both servers when the owner exits. Its command line names DIR, so stop_pidfile
    # recognises it.
    bash -c 'd=$1; owner=$2; script=$3
      while kill -0 "$owner" 2>/dev/null && [ -f "$d/etcd.pid" ]; do sleep 1; done
      [ -f "$d/etcd.pid" ] && rm -f "$d/watchdog.pid" && exec bash "$script" stop "$d"' \
      sluice-kube-watchdog "$d" "$KUBE_APISERVER_OWNER_PID" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" \
      </dev/null >>"$d/watchdog.log" 2>&1 &
    echo $! >"$d/watchdog.pid"
  fi
  say "ready at $(cat "$d/url") in $(( ($(date +%s%N) - t0) / 1000000 )) ms; kubeconfig $d/kubeconfig"
}

cmd_stop() {
  [ $# -eq 1 ] || die "usage: $0 stop DIR"
  [ -d "$1" ] || return 0
  local d
  d=$(cd "$1" && pwd)
  stop_servers "$d"
}

cmd_stop_apiserver() {
  if [ $# -ne 1 ] || [ ! -f "$1/ports" ]; then die "usage: $0 stop-apiserver DIR (of a started server)"; fi
  local d
  d=$(cd "$1" && pwd)
  stop_pidfile "$d" kube-apiserver "${SIGNAL:-TERM}"
}

cmd_start_apiserver() {
  if [ $# -ne 1 ] || [ ! -f "$1/ports" ]; then die "usage: $0 start-apiserver DIR (of a started server)"; fi
  local d rc=0
  d=$(cd "$1" && pwd)
  alive "$(cat "$d/kube-apiserver.pid" 2>/dev/null)" && die "$d: kube-apiserver is running"
  alive "$(cat "$d/etcd.pid" 2>/dev/null)" || die "$d: etcd is not running"
  launch_apiserver "$d" || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 30 "$d/kube-apiserver.log" >&2
    stop_pidfile "$d" kube-apiserver
    die "kube-apiserver did not come back on $(cat "$d/url") (log: $d/kube-apiserver.log)"
  fi
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  stop-apiserver) shift; cmd_stop_apiserver "$@" ;;
  start-apiserver) shift; cmd_start_apiserver "$@" ;;
  *) echo "usage: $0 build | start DIR [EXTRA KUBE-APISERVER FLAGS...] | stop DIR | stop-apiserver DIR | start-apiserver DIR" >&2; exit 2 ;;
esac
