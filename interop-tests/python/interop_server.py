"""A grpcio `grpc.testing.TestService` upstream, so pnp is tested against a gRPC server that is
not tonic (interop-tests/tests/python_clients.rs starts it as a child process).

It listens on 127.0.0.1 (h2c) at a port the OS picks, serves its counters as JSON on a second
port (`GET /` -> {"started", "cancelled", "active"}, the same shape as the Rust drivers' stats
endpoint for the demo upstream), prints one line `{"grpc_port": N, "stats_port": M}` and serves
until its standard input closes or it is killed.

Semantics follow grpc/doc/interop-test-descriptions.md: payloads of zero bytes of the asked
size, `response_status` echoed as the call's status, `x-grpc-test-echo-initial` echoed as a
header and `x-grpc-test-echo-trailing-bin` as a trailer.
"""

import http.server
import json
import sys
import threading
from concurrent import futures

import grpc

import stubs  # noqa: F401  (generates grpc_testing)
from grpc_testing import empty_pb2, messages_pb2, test_pb2_grpc

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"


class Stats:
    """Handler calls started, ended by the client (cancelled, deadline) and still running."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = 0
        self.cancelled = 0
        self.active = 0

    def snapshot(self):
        with self._lock:
            return {"started": self.started, "cancelled": self.cancelled, "active": self.active}

    def begin(self, context):
        """Counts a call; returns an Event set when the RPC terminates."""
        terminated = threading.Event()

        def on_termination():
            # Whether the client (or its deadline) ended the call is what grpcio's core
            # reported for it; the handler cannot tell: on a reset stream its request iterator
            # may just stop, as if the client had half-closed (receive_message and
            # receive_close_on_server race in grpc/_server.py). So read the RPC's final state.
            state = getattr(context, "_state", None)
            cancelled = getattr(state, "client", None) == "cancelled"
            with self._lock:
                self.active -= 1
                self.cancelled += int(cancelled)
            terminated.set()

        with self._lock:
            self.started += 1
            self.active += 1
        if not context.add_callback(on_termination):
            # Already terminated.
            on_termination()
        return terminated


def _echo_metadata(context):
    metadata = dict(context.invocation_metadata())
    if ECHO_INITIAL in metadata:
        context.send_initial_metadata([(ECHO_INITIAL, metadata[ECHO_INITIAL])])
    if ECHO_TRAILING in metadata:
        context.set_trailing_metadata([(ECHO_TRAILING, metadata[ECHO_TRAILING])])


def _abort_if_asked(context, echo_status):
    if echo_status is not None and echo_status.code != 0:
        context.abort(_status_code(echo_status.code), echo_status.message)


def _echo_status(request):
    return request.response_status if request.HasField("response_status") else None


def _status_code(number):
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


def _payload(size):
    return messages_pb2.Payload(body=bytes(size))


class TestService(test_pb2_grpc.TestServiceServicer):
    def __init__(self, stats):
        self.stats = stats

    def EmptyCall(self, request, context):
        self.stats.begin(context)
        _echo_metadata(context)
        return empty_pb2.Empty()

    def UnaryCall(self, request, context):
        self.stats.begin(context)
        _echo_metadata(context)
        _abort_if_asked(context, _echo_status(request))
        return messages_pb2.SimpleResponse(payload=_payload(request.response_size))

    def _respond(self, parameters, terminated):
        for p in parameters:
            # Sleeps end early when the call terminates (cancelled, deadline).
            if p.interval_us > 0 and terminated.wait(p.interval_us / 1_000_000):
                return
            yield messages_pb2.StreamingOutputCallResponse(payload=_payload(p.size))

    def StreamingOutputCall(self, request, context):
        terminated = self.stats.begin(context)
        _echo_metadata(context)
        yield from self._respond(request.response_parameters, terminated)
        if terminated.is_set():
            return
        _abort_if_asked(context, _echo_status(request))

    def StreamingInputCall(self, request_iterator, context):
        self.stats.begin(context)
        _echo_metadata(context)
        total = sum(len(r.payload.body) for r in request_iterator)
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=total)

    def FullDuplexCall(self, request_iterator, context):
        terminated = self.stats.begin(context)
        _echo_metadata(context)
        for request in request_iterator:
            _abort_if_asked(context, _echo_status(request))
            yield from self._respond(request.response_parameters, terminated)
            if terminated.is_set():
                return

    def UnimplementedCall(self, request, context):
        self.stats.begin(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "grpcio upstream: UnimplementedCall is not implemented")


def _stats_server(stats):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(stats.snapshot()).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("access-control-allow-origin", "*")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    stats = Stats()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    test_pb2_grpc.add_TestServiceServicer_to_server(TestService(stats), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stats_server = _stats_server(stats)
    print(json.dumps({"grpc_port": port, "stats_port": stats_server.server_address[1]}), flush=True)
    # Serve until the parent closes our standard input (or kills us).
    sys.stdin.read()
    server.stop(grace=0)
    stats_server.shutdown()


if __name__ == "__main__":
    main()
