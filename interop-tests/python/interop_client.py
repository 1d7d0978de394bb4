"""The gRPC interop cases with the grpcio client, native gRPC over h2c through pnp.

interop-tests/tests/python_clients.rs runs this with PNP_TARGET (the proxy, host:port) and
PNP_STATS_URL (the upstream's counters: {"started", "cancelled", "active"}), against the tonic
demo upstream and against the grpcio one (interop_server.py, PNP_UPSTREAM=grpcio). Cases and values follow
grpc/doc/interop-test-descriptions.md; a grpcio client can stream requests, so the
client-streaming and full-duplex cases run here too.
"""

import json
import os
import queue
import time
import unittest
import urllib.request

import grpc

import stubs  # noqa: F401  (generates grpc_testing)
from grpc_testing import empty_pb2, messages_pb2, test_pb2_grpc

TARGET = os.environ.get("PNP_TARGET", "")
STATS_URL = os.environ.get("PNP_STATS_URL", "")
# The transport pnp's egress names in x-pnp-transport (h1 or h3 when run through a bridge).
TRANSPORT = os.environ.get("PNP_TRANSPORT", "h2")
# The tonic demo upstream counts cancelled response streams only; the grpcio upstream counts
# every call, so it can also show a cancelled client-streaming call.
UPSTREAM_COUNTS_CLIENT_STREAMS = os.environ.get("PNP_UPSTREAM") == "grpcio"

ECHO_INITIAL = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
ECHO_TRAILING = ("x-grpc-test-echo-trailing-bin", b"\xab\xab\xab")
SPECIAL_STATUS_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
CANCEL_OBSERVED_WITHIN = 3.0


def payload(size):
    return messages_pb2.Payload(body=bytes(size))


def payload_size(response):
    body = response.payload.body
    assert body == bytes(len(body)), f"payload of {len(body)} bytes is not all zero"
    return len(body)


def upstream_stats():
    with urllib.request.urlopen(STATS_URL, timeout=5) as response:
        return json.load(response)


def wait_for_stats(predicate, what):
    deadline = time.monotonic() + CANCEL_OBSERVED_WITHIN
    stats = upstream_stats()
    while not predicate(stats):
        if time.monotonic() > deadline:
            raise AssertionError(f"upstream never saw {what}: {stats}")
        time.sleep(0.02)
        stats = upstream_stats()
    return stats


class Requests:
    """A request stream fed one message at a time; `None` ends it."""

    def __init__(self):
        self._queue = queue.Queue()

    def send(self, message):
        self._queue.put(message)

    def close(self):
        self._queue.put(None)

    def __iter__(self):
        return self

    def __next__(self):
        message = self._queue.get()
        if message is None:
            raise StopIteration
        return message


class InteropThroughPnp(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not TARGET or not STATS_URL:
            raise RuntimeError("PNP_TARGET and PNP_STATS_URL must be set (run through cargo test)")
        cls.channel = grpc.insecure_channel(TARGET)
        grpc.channel_ready_future(cls.channel).result(timeout=10)
        cls.stub = test_pb2_grpc.TestServiceStub(cls.channel)
        cls.unimplemented = test_pb2_grpc.UnimplementedServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()

    def assert_status(self, error, code, message):
        self.assertEqual((error.code(), error.details()), (code, message))

    def test_empty_unary(self):
        response, call = self.stub.EmptyCall.with_call(empty_pb2.Empty(), timeout=10)
        self.assertEqual(response, empty_pb2.Empty())
        self.assertIn(("x-pnp-transport", TRANSPORT), call.initial_metadata())
        self.assertEqual(call.code(), grpc.StatusCode.OK)

    def test_large_unary(self):
        request = messages_pb2.SimpleRequest(response_size=314159, payload=payload(271828))
        response = self.stub.UnaryCall(request, timeout=10)
        self.assertEqual(payload_size(response), 314159)

    def test_client_streaming(self):
        requests = [messages_pb2.StreamingInputCallRequest(payload=payload(n)) for n in (27182, 8, 1828, 45904)]
        response = self.stub.StreamingInputCall(iter(requests), timeout=10)
        self.assertEqual(response.aggregated_payload_size, 74922)

    def test_server_streaming(self):
        sizes = [31415, 9, 2653, 58979]
        request = messages_pb2.StreamingOutputCallRequest(
            response_parameters=[messages_pb2.ResponseParameters(size=n) for n in sizes]
        )
        self.assertEqual([payload_size(r) for r in self.stub.StreamingOutputCall(request, timeout=10)], sizes)

    def test_ping_pong(self):
        requests = Requests()
        responses = self.stub.FullDuplexCall(requests, timeout=10)
        for response_size, request_size in [(31415, 27182), (9, 8), (2653, 1828), (58979, 45904)]:
            requests.send(
                messages_pb2.StreamingOutputCallRequest(
                    response_parameters=[messages_pb2.ResponseParameters(size=response_size)],
                    payload=payload(request_size),
                )
            )
            self.assertEqual(payload_size(next(responses)), response_size)
        requests.close()
        self.assertEqual(list(responses), [])
        self.assertEqual(responses.code(), grpc.StatusCode.OK)

    def test_empty_stream(self):
        responses = self.stub.FullDuplexCall(iter([]), timeout=10)
        self.assertEqual(list(responses), [])
        self.assertEqual(responses.code(), grpc.StatusCode.OK)

    def test_custom_metadata_unary(self):
        request = messages_pb2.SimpleRequest(response_size=314159, payload=payload(271828))
        response, call = self.stub.UnaryCall.with_call(request, metadata=[ECHO_INITIAL, ECHO_TRAILING], timeout=10)
        self.assertEqual(payload_size(response), 314159)
        self.assertIn(ECHO_INITIAL, call.initial_metadata())
        self.assertIn(ECHO_TRAILING, call.trailing_metadata())

    def test_custom_metadata_full_duplex(self):
        request = messages_pb2.StreamingOutputCallRequest(
            response_parameters=[messages_pb2.ResponseParameters(size=314159)], payload=payload(271828)
        )
        responses = self.stub.FullDuplexCall(iter([request]), metadata=[ECHO_INITIAL, ECHO_TRAILING], timeout=10)
        self.assertEqual([payload_size(r) for r in responses], [314159])
        self.assertIn(ECHO_INITIAL, responses.initial_metadata())
        self.assertIn(ECHO_TRAILING, responses.trailing_metadata())

    def test_status_code_and_message_unary(self):
        request = messages_pb2.SimpleRequest(
            response_status=messages_pb2.EchoStatus(code=2, message="test status message")
        )
        with self.assertRaises(grpc.RpcError) as raised:
            self.stub.UnaryCall(request, timeout=10)
        self.assert_status(raised.exception, grpc.StatusCode.UNKNOWN, "test status message")

    def test_status_code_and_message_full_duplex(self):
        request = messages_pb2.StreamingOutputCallRequest(
            response_status=messages_pb2.EchoStatus(code=2, message="test status message")
        )
        responses = self.stub.FullDuplexCall(iter([request]), timeout=10)
        with self.assertRaises(grpc.RpcError) as raised:
            list(responses)
        self.assert_status(raised.exception, grpc.StatusCode.UNKNOWN, "test status message")

    def test_special_status_message(self):
        request = messages_pb2.SimpleRequest(
            response_status=messages_pb2.EchoStatus(code=2, message=SPECIAL_STATUS_MESSAGE)
        )
        with self.assertRaises(grpc.RpcError) as raised:
            self.stub.UnaryCall(request, timeout=10)
        self.assert_status(raised.exception, grpc.StatusCode.UNKNOWN, SPECIAL_STATUS_MESSAGE)

    def test_unimplemented_method(self):
        with self.assertRaises(grpc.RpcError) as raised:
            self.stub.UnimplementedCall(empty_pb2.Empty(), timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNIMPLEMENTED)

    def test_unimplemented_service(self):
        with self.assertRaises(grpc.RpcError) as raised:
            self.unimplemented.UnimplementedCall(empty_pb2.Empty(), timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNIMPLEMENTED)

    def test_timeout_on_sleeping_server(self):
        requests = Requests()
        requests.send(
            messages_pb2.StreamingOutputCallRequest(
                response_parameters=[messages_pb2.ResponseParameters(size=31415, interval_us=1_000_000)],
                payload=payload(27182),
            )
        )
        responses = self.stub.FullDuplexCall(requests, timeout=0.001)
        try:
            with self.assertRaises(grpc.RpcError) as raised:
                list(responses)
        finally:
            requests.close()
        self.assertEqual(raised.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        wait_for_stats(lambda s: s["active"] == 0, "the sleeping call end")

    def test_cancel_after_begin(self):
        before = upstream_stats()
        requests = Requests()
        future = self.stub.StreamingInputCall.future(requests, timeout=10)
        # Cancel once the call has reached the upstream.
        wait_for_stats(lambda s: s["started"] > before["started"], "the call start")
        future.cancel()
        try:
            self.assertEqual(future.code(), grpc.StatusCode.CANCELLED)
            if UPSTREAM_COUNTS_CLIENT_STREAMS:
                after = wait_for_stats(
                    lambda s: s["cancelled"] > before["cancelled"] and s["active"] == 0, "the cancellation"
                )
                self.assertEqual(after["cancelled"], before["cancelled"] + 1)
        finally:
            # Only now: ending the request stream first could reach the upstream as a
            # half-close before the cancel.
            requests.close()

    def test_cancel_after_first_response(self):
        before = upstream_stats()
        requests = Requests()
        responses = self.stub.FullDuplexCall(requests, timeout=10)
        requests.send(
            messages_pb2.StreamingOutputCallRequest(
                response_parameters=[messages_pb2.ResponseParameters(size=31415)], payload=payload(27182)
            )
        )
        self.assertEqual(payload_size(next(responses)), 31415)
        responses.cancel()
        try:
            self.assertEqual(responses.code(), grpc.StatusCode.CANCELLED)
            after = wait_for_stats(
                lambda s: s["cancelled"] > before["cancelled"] and s["active"] == 0, "the cancellation"
            )
            self.assertEqual(after["cancelled"], before["cancelled"] + 1)
        finally:
            requests.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
