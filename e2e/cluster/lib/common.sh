# shellcheck shell=bash disable=SC2034
# Shared helpers for e2e/cluster scripts. Source it; sets CLUSTER_DIR, BUILD, RUN, BIN.
set -euo pipefail
CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$CLUSTER_DIR/.build"
RUN="$CLUSTER_DIR/.run"
BIN="$BUILD/bin"
LOGS="$RUN/logs"

# Versions (one place).
K8S_VERSION=v1.34.4
COREDNS_VERSION=v1.13.2
HELM_VERSION=v3.19.5
KWOK_VERSION=v0.7.0

# Addresses and CIDRs (documented in docs/local-cluster.md).
NODE_NAME=kestrel-node
NODE_IP=10.244.0.1           # address of bridge kestrel0: node InternalIP, apiserver bind/advertise address
POD_CIDR=10.244.0.0/16       # pods get 10.244.0.2 and up on bridge kestrel0
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_SVC_IP=10.96.0.10
CLUSTER_DOMAIN=cluster.local
APISERVER_PORT=6443
BRIDGE=kestrel0
CONTAINERD_SOCK="$RUN/containerd/containerd.sock"
PAUSE_IMAGE=localhost/kestrel/pause:3.10
SIM_POD_CIDR=10.244.255.0/24   # fake pod IPs of pods on kwok's simulated nodes (never handed out by CNI)
SIM_NODE_IP=10.244.255.254

_t0=0
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
fmt_ms() { printf '%d.%ds' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 )); }
phase() { _t0=$(now_ms); printf '==> %s\n' "$*"; }
done_phase() { printf '    done in %s%s\n' "$(fmt_ms $(( $(now_ms) - _t0 )))" "${1:+ ($1)}"; }
log() { printf '    %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# wait_for SECONDS DESCRIPTION CMD... : poll CMD every 0.5s until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= end )); then echo "timed out after ${secs}s waiting for $what" >&2; return 1; fi
    sleep 0.5
  done
}

# ours PID: the process exists and is one of ours (its command line names this folder or the
# node address), so a pid file left over from before a reboot never makes us touch a stranger.
ours() {
  local cmd
  [[ -n $1 && -r /proc/$1/cmdline ]] || return 1
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
  [[ $cmd == *"$CLUSTER_DIR"* || $cmd == *"bind=$NODE_IP"* ]]
}
