#!/bin/sh
# Installs the sluice CNI plugin and its network configuration on the node: the init container
# of the sluice DaemonSet runs it (it is in the image at /usr/local/bin/install-cni.sh).
#
# Each file is copied to a temporary name in its target directory, flushed, then renamed over
# the target: rename(2) in one directory is atomic, so the container runtime sees the old file
# or the new one, never a partial one, and a running plugin binary is never overwritten in
# place (no ETXTBSY, no torn executable). The binary goes first, so a conflist naming `sluice`
# never appears before the plugin it names. Files already identical are left alone.
#
# Environment (defaults are the DaemonSet's paths):
#   SLUICE_PLUGIN_SRC    the plugin binary in the image        (/opt/sluice/bin/sluice)
#   SLUICE_CONFLIST_SRC  the conflist from the ConfigMap        (/etc/sluice/cni/10-sluice.conflist)
#   CNI_BIN_DIR          the host's /opt/cni/bin, mounted       (/host/opt/cni/bin)
#   CNI_NET_DIR          the host's /etc/cni/net.d, mounted     (/host/etc/cni/net.d)
#   SLUICE_CONFLIST_NAME the conflist's name on the host        (10-sluice.conflist)
# POSIX sh (dash, busybox): no bashisms.
set -eu

PLUGIN_SRC=${SLUICE_PLUGIN_SRC:-/opt/sluice/bin/sluice}
CONFLIST_SRC=${SLUICE_CONFLIST_SRC:-/etc/sluice/cni/10-sluice.conflist}
BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
NET_DIR=${CNI_NET_DIR:-/host/etc/cni/net.d}
CONFLIST_NAME=${SLUICE_CONFLIST_NAME:-10-sluice.conflist}

log() { echo "install-cni: $*" >&2; }
die() { log "error: $*"; exit 1; }

tmp=""
cleanup() { [ -z "$tmp" ] || rm -f "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# install_atomic SRC DIR NAME MODE
install_atomic() {
  src=$1 dir=$2 name=$3 mode=$4
  [ -f "$src" ] || die "$src is missing"
  [ -s "$src" ] || die "$src is empty"
  [ -d "$dir" ] || die "$dir is not a directory (is the host path mounted?)"
  if [ -f "$dir/$name" ] && cmp -s "$src" "$dir/$name"; then
    chmod "$mode" "$dir/$name"
    log "$dir/$name is up to date"
    return 0
  fi
  tmp="$dir/.$name.sluice-tmp.$$"
  rm -f "$tmp"
  cp "$src" "$tmp"
  chmod "$mode" "$tmp"
  # Flush the data before the rename makes it visible (a crash must not leave an empty file).
  sync "$tmp" 2>/dev/null || sync
  mv -f "$tmp" "$dir/$name"
  tmp=""
  log "installed $dir/$name"
}

# A conflist that is not even an object would make the runtime skip the network: refuse it
# (a full JSON check needs a parser; the plugin validates the rest when it is called).
first=$(tr -d ' \t\r\n' <"$CONFLIST_SRC" 2>/dev/null | cut -c1-1) || true
[ "$first" = "{" ] || die "$CONFLIST_SRC does not hold a JSON object"
grep -q '"type"[[:space:]]*:[[:space:]]*"sluice"' "$CONFLIST_SRC" \
  || die "$CONFLIST_SRC has no plugin of type sluice"

install_atomic "$PLUGIN_SRC" "$BIN_DIR" sluice 0755
install_atomic "$CONFLIST_SRC" "$NET_DIR" "$CONFLIST_NAME" 0644
# Leftovers of an installer killed between copy and rename.
for f in "$BIN_DIR"/.sluice.sluice-tmp.* "$NET_DIR/.$CONFLIST_NAME".sluice-tmp.*; do
  if [ -e "$f" ]; then rm -f "$f"; fi
done
log "done"
