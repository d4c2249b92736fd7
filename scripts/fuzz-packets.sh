#!/usr/bin/env bash
# The differential packet fuzzer of the pod datapath (issue 7): N packets (default 10000) through
# the real BPF programs (BPF_PROG_TEST_RUN) and through a model written from bpf/RULES.md.
#   scripts/fuzz-packets.sh N [SEED]     SEED: decimal or 0x-hex; random (and printed) if omitted
# Replays one scenario of a report with FUZZ_SCENARIO=<n>. Ends with the line
# "packets: N, disagreements: D"; exit status 0 only when D = 0. Needs root (loads BPF).
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-10000}
seed=${2:-$(printf '0x%016x' "$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')")}
case $n in ''|*[!0-9]*) echo "usage: $0 N [SEED]" >&2; exit 2;; esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (BPF_PROG_TEST_RUN loads BPF programs)" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

echo "fuzz-packets: $n packets, seed $seed"
result=$(mktemp)
trap 'rm -f "$result"' EXIT
FUZZ_PACKETS=$n FUZZ_SEED=$seed FUZZ_RESULT=$result \
  cargo test --release --locked -p sluice-dataplaned --test fuzz_packets -- \
  --ignored --exact fuzz_cli --nocapture --test-threads=1 >&2 || true
line=$(cat "$result")
if [ -z "$line" ]; then
  echo "fuzz-packets: the fuzzer did not finish (build or harness failure above)" >&2
  echo "packets: 0, disagreements: unknown"
  exit 1
fi
echo "$line"
case $line in *", disagreements: 0") exit 0;; *) exit 1;; esac
