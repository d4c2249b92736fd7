#!/usr/bin/env bash
# Installs everything sluice needs to build, demo and test on a fresh Debian 12 machine (as root):
# apt packages, cnitool (built from Debian's own source package, offline), and bpffs.
# Idempotent: a second run only checks.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root" >&2; exit 1; }

APT=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
PKGS=(
  # BPF build: libbpf-sys compiles libbpf and links libelf/zlib; clang compiles bpf/*.c
  clang llvm libelf-dev zlib1g-dev pkg-config make gcc
  # tonic/prost codegen
  protobuf-compiler
  # namespaces, reference CNI plugins (portmap, bandwidth, ptp, bridge, host-local), tools for tests
  iproute2 containernetworking-plugins netcat-openbsd iperf3 tcpdump bpftool util-linux procps
  iptables conntrack python3 iputils-ping ethtool
  # bench: kube-proxy nftables mode
  nftables
  # cnitool is built from Debian's source of libcni
  golang-go golang-github-appc-cni-dev dpkg-dev
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${APT[@]}" update
  "${APT[@]}" install --no-install-recommends "${missing[@]}"
fi

# cnitool: not packaged as a binary in Debian 12; build it from golang-github-appc-cni's source.
CNITOOL=/usr/local/bin/cnitool
if [ ! -x "$CNITOOL" ]; then
  echo "install-deps: building cnitool from Debian source" >&2
  # enable deb-src from the machine's own entry (never hard-code a mirror)
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        > /etc/apt/sources.list.d/sluice-deb-src.sources
    elif [ -f /etc/apt/sources.list ]; then
      sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/sluice-deb-src.list
    fi
    "${APT[@]}" update
  fi
  build=$(mktemp -d /tmp/sluice-cnitool.XXXXXX)
  trap 'rm -rf "$build"' EXIT
  (
    cd "$build"
    apt-get source -q --download-only golang-github-appc-cni >/dev/null
    dpkg-source -x --no-check ./*.dsc src >/dev/null
    mkdir -p gopath
    GO111MODULE=off GOPATH="$build/gopath:/usr/share/gocode" GOCACHE="$build/cache" \
      go build -o "$CNITOOL" ./src/cnitool
  )
fi

# Rust toolchain: the machine's rustup toolchain; rustfmt for the fmt check.
command -v cargo >/dev/null || { echo "install-deps: cargo not found (install rustup's stable toolchain)" >&2; exit 1; }

# bpffs: not mounted at boot on this machine kind.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "install-deps: ok" >&2
