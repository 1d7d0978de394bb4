// The gRPC interop cases (grpc/doc/interop-test-descriptions.md) that a gRPC-Web client can
// run, written once against a small client interface that each library adapter implements
// (lib/clients/*.mjs). Client-streaming and full-duplex cases need a client that can stream
// requests: browsers and the gRPC-Web libraries cannot, so only adapters that offer
// `clientStream`/`bidi` (native gRPC over HTTP/2) run them.
//
// An adapter is
//   { unary(method, request, options), serverStream(method, request, options),
//     clientStream?(method, requests, options), bidi?(method, requests, options) }
// where `method` is a protobuf-es method descriptor, `options` is
//   { metadata?: Record<string, string>, timeoutMs?: number, cancelAfter?: number,
//     cancelAfterMs?: number, onMessage?: (message) => void }
// (`cancelAfter`: cancel the call once that many responses arrived; `cancelAfterMs`: that many
// milliseconds after it started, needed for adapters with `incremental: false`, which deliver
// a stream only once it has ended; `onMessage`: called as each response is delivered) and
// every call resolves,
// whatever the status, to an Outcome:
//   { messages: Message[], headers: Record<string, string>, trailers: Record<string, string>,
//     code: number, message: string }
// with lower-case header names and `-bin` values as the base64 text that was received.

import assert from "node:assert/strict";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";

import { EmptySchema } from "../gen/grpc/testing/empty_pb.js";
import {
  EchoStatusSchema,
  PayloadSchema,
  ResponseParametersSchema,
  SimpleRequestSchema,
  StreamingInputCallRequestSchema,
  StreamingOutputCallRequestSchema,
} from "../gen/grpc/testing/messages_pb.js";
import { TestService, UnimplementedService } from "../gen/grpc/testing/test_pb.js";
import { expectedTransport, upstreamStats, waitForStats } from "./env.mjs";

/** gRPC status codes used here. */
export const Code = Object.freeze({
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  DEADLINE_EXCEEDED: 4,
  UNIMPLEMENTED: 12,
  UNAVAILABLE: 14,
});

export const LARGE_REQUEST_SIZE = 271_828;
export const LARGE_RESPONSE_SIZE = 314_159;
export const STREAMING_RESPONSE_SIZES = [31_415, 9, 2_653, 58_979];
export const CLIENT_STREAMING_SIZES = [27_182, 8, 1_828, 45_904];
export const PING_PONG_SIZES = [
  [31_415, 27_182],
  [9, 8],
  [2_653, 1_828],
  [58_979, 45_904],
];
export const PING_REQUEST_SIZE = 27_182;
export const PING_RESPONSE_SIZE = 31_415;

export const ECHO_INITIAL = "x-grpc-test-echo-initial";
export const ECHO_INITIAL_VALUE = "test_initial_metadata_value";
export const ECHO_TRAILING = "x-grpc-test-echo-trailing-bin";
/** 0xababab, base64. */
export const ECHO_TRAILING_VALUE = "q6ur";

export const STATUS_MESSAGE = "test status message";
export const SPECIAL_STATUS_MESSAGE =
  "\t\ntest with whitespace\r\nand Unicode BMP \u263A and non-BMP \u{1F608}\t\n";

/** How long the upstream may take to notice a cancelled call. */
const CANCEL_OBSERVED_WITHIN_MS = 3_000;

export const methods = {
  emptyCall: TestService.method.emptyCall,
  unaryCall: TestService.method.unaryCall,
  streamingOutputCall: TestService.method.streamingOutputCall,
  streamingInputCall: TestService.method.streamingInputCall,
  fullDuplexCall: TestService.method.fullDuplexCall,
  unimplementedCall: TestService.method.unimplementedCall,
  unimplementedServiceCall: UnimplementedService.method.unimplementedCall,
};

/** `size` zero bytes as a COMPRESSABLE payload. */
export function zeroPayload(size) {
  return create(PayloadSchema, { body: new Uint8Array(size) });
}

/** The size of a response payload, asserting it is all zero bytes. */
export function payloadSize(message) {
  const body = message.payload?.body ?? new Uint8Array(0);
  assert.ok(
    body.every((b) => b === 0),
    `payload of ${body.length} bytes is not all zero`,
  );
  return body.length;
}

/** Decodes base64 as gRPC sends it in `-bin` metadata (padding optional). */
export function decodeBin(text) {
  return [...Buffer.from(text.trim(), "base64")];
}

export function streamingRequest(sizes, { intervalUs = 0, payloadSize = 0 } = {}) {
  return create(StreamingOutputCallRequestSchema, {
    responseParameters: sizes.map((size) =>
      create(ResponseParametersSchema, { size, intervalUs }),
    ),
    payload: payloadSize > 0 ? zeroPayload(payloadSize) : undefined,
  });
}

function statusRequest(schema, code, message, extra = {}) {
  return create(schema, {
    ...extra,
    responseStatus: create(EchoStatusSchema, { code, message }),
  });
}

function assertStatus(outcome, code, message) {
  assert.deepEqual(
    { code: outcome.code, message: outcome.message },
    { code, message },
    `status (trailers ${JSON.stringify(outcome.trailers)})`,
  );
}

function assertOk(outcome) {
  assertStatus(outcome, Code.OK, "");
}

/** The reply went through pnp, whose egress names itself in `x-pnp-transport`. */
function assertViaPnp(outcome) {
  assert.equal(
    outcome.headers["x-pnp-transport"],
    expectedTransport(),
    `headers ${JSON.stringify(outcome.headers)}`,
  );
}

const echoMetadata = {
  [ECHO_INITIAL]: ECHO_INITIAL_VALUE,
  [ECHO_TRAILING]: ECHO_TRAILING_VALUE,
};

function assertEchoedMetadata(outcome) {
  assert.equal(outcome.headers[ECHO_INITIAL], ECHO_INITIAL_VALUE, `headers ${JSON.stringify(outcome.headers)}`);
  const trailing = outcome.trailers[ECHO_TRAILING];
  assert.ok(trailing !== undefined, `no ${ECHO_TRAILING} in trailers ${JSON.stringify(outcome.trailers)}`);
  assert.deepEqual(decodeBin(trailing), [0xab, 0xab, 0xab]);
}

/** Async iterable of `items`, for the request side of streaming calls. */
async function* each(items) {
  for (const item of items) {
    yield item;
  }
}

/**
 * The cases, by name. Each takes the adapter and throws on a mismatch. Names follow the
 * interop descriptions; a suffix says which variant of a case it is.
 */
export const cases = {
  async empty_unary(client) {
    const outcome = await client.unary(methods.emptyCall, create(EmptySchema));
    assertOk(outcome);
    assert.equal(outcome.messages.length, 1);
    assertViaPnp(outcome);
  },

  async large_unary(client) {
    const request = create(SimpleRequestSchema, {
      responseSize: LARGE_RESPONSE_SIZE,
      payload: zeroPayload(LARGE_REQUEST_SIZE),
    });
    const outcome = await client.unary(methods.unaryCall, request);
    assertOk(outcome);
    assert.equal(outcome.messages.length, 1);
    assert.equal(payloadSize(outcome.messages[0]), LARGE_RESPONSE_SIZE);
    assertViaPnp(outcome);
  },

  async server_streaming(client) {
    const outcome = await client.serverStream(
      methods.streamingOutputCall,
      streamingRequest(STREAMING_RESPONSE_SIZES),
    );
    assertOk(outcome);
    assert.deepEqual(outcome.messages.map(payloadSize), STREAMING_RESPONSE_SIZES);
    assertViaPnp(outcome);
  },

  async custom_metadata_unary(client) {
    const request = create(SimpleRequestSchema, {
      responseSize: LARGE_RESPONSE_SIZE,
      payload: zeroPayload(LARGE_REQUEST_SIZE),
    });
    const outcome = await client.unary(methods.unaryCall, request, { metadata: echoMetadata });
    assertOk(outcome);
    assert.equal(payloadSize(outcome.messages[0]), LARGE_RESPONSE_SIZE);
    assertEchoedMetadata(outcome);
  },

  // The interop case uses FullDuplexCall; a gRPC-Web client cannot, so the streaming half
  // runs over a server stream (same metadata path: headers first, trailers last).
  async custom_metadata_server_streaming(client) {
    const request = streamingRequest([LARGE_RESPONSE_SIZE], { payloadSize: LARGE_REQUEST_SIZE });
    const outcome = await client.serverStream(methods.streamingOutputCall, request, {
      metadata: echoMetadata,
    });
    assertOk(outcome);
    assert.deepEqual(outcome.messages.map(payloadSize), [LARGE_RESPONSE_SIZE]);
    assertEchoedMetadata(outcome);
  },

  async status_code_and_message_unary(client) {
    const request = statusRequest(SimpleRequestSchema, Code.UNKNOWN, STATUS_MESSAGE);
    const outcome = await client.unary(methods.unaryCall, request);
    assertStatus(outcome, Code.UNKNOWN, STATUS_MESSAGE);
    assert.equal(outcome.messages.length, 0);
  },

  async status_code_and_message_server_streaming(client) {
    const request = statusRequest(StreamingOutputCallRequestSchema, Code.UNKNOWN, STATUS_MESSAGE, {
      responseParameters: [create(ResponseParametersSchema, { size: 1 })],
    });
    const outcome = await client.serverStream(methods.streamingOutputCall, request);
    assertStatus(outcome, Code.UNKNOWN, STATUS_MESSAGE);
  },

  async special_status_message(client) {
    const request = statusRequest(SimpleRequestSchema, Code.UNKNOWN, SPECIAL_STATUS_MESSAGE);
    const outcome = await client.unary(methods.unaryCall, request);
    assertStatus(outcome, Code.UNKNOWN, SPECIAL_STATUS_MESSAGE);
  },

  async unimplemented_method(client) {
    const outcome = await client.unary(methods.unimplementedCall, create(EmptySchema));
    assert.equal(outcome.code, Code.UNIMPLEMENTED, `message ${JSON.stringify(outcome.message)}`);
    assert.equal(outcome.messages.length, 0);
  },

  async unimplemented_service(client) {
    const outcome = await client.unary(methods.unimplementedServiceCall, create(EmptySchema));
    assert.equal(outcome.code, Code.UNIMPLEMENTED, `message ${JSON.stringify(outcome.message)}`);
    assert.equal(outcome.messages.length, 0);
  },

  async timeout_on_sleeping_server(client) {
    const request = streamingRequest([PING_RESPONSE_SIZE], {
      intervalUs: 1_000_000,
      payloadSize: PING_REQUEST_SIZE,
    });
    const outcome = await client.serverStream(methods.streamingOutputCall, request, { timeoutMs: 1 });
    assert.equal(outcome.code, Code.DEADLINE_EXCEEDED, `message ${JSON.stringify(outcome.message)}`);
    assert.equal(outcome.messages.length, 0);
    // Nothing is left running upstream once the deadline has passed.
    await waitForStats((s) => s.active === 0, CANCEL_OBSERVED_WITHIN_MS, "the sleeping call end");
  },

  async cancel_after_first_response(client) {
    const before = await upstreamStats();
    const request = create(StreamingOutputCallRequestSchema, {
      responseParameters: [
        create(ResponseParametersSchema, { size: PING_RESPONSE_SIZE }),
        create(ResponseParametersSchema, { size: 9, intervalUs: 10_000_000 }),
      ],
      payload: zeroPayload(PING_REQUEST_SIZE),
    });
    const outcome = await client.serverStream(methods.streamingOutputCall, request, {
      cancelAfter: 1,
    });
    assert.equal(outcome.code, Code.CANCELLED, `message ${JSON.stringify(outcome.message)}`);
    assert.deepEqual(outcome.messages.map(payloadSize), [PING_RESPONSE_SIZE]);
    const after = await waitForStats(
      (s) => s.cancelled > before.cancelled && s.active === 0,
      CANCEL_OBSERVED_WITHIN_MS,
      "the cancellation",
    );
    assert.equal(after.cancelled, before.cancelled + 1);
  },
};

/**
 * For clients that see a stream only once it has ended, in place of
 * cancel_after_first_response: cancel a server stream that is still waiting for its first
 * response, and check that the cancellation reaches the upstream.
 */
export const nonIncrementalCases = {
  async cancel_after_begin(client) {
    const before = await upstreamStats();
    const request = streamingRequest([PING_RESPONSE_SIZE], {
      intervalUs: 10_000_000,
      payloadSize: PING_REQUEST_SIZE,
    });
    const outcome = await client.serverStream(methods.streamingOutputCall, request, {
      cancelAfterMs: 300,
    });
    assert.equal(outcome.code, Code.CANCELLED, `message ${JSON.stringify(outcome.message)}`);
    assert.equal(outcome.messages.length, 0);
    const after = await waitForStats(
      (s) => s.cancelled > before.cancelled && s.active === 0,
      CANCEL_OBSERVED_WITHIN_MS,
      "the cancellation",
    );
    assert.equal(after.started, before.started + 1);
    assert.equal(after.cancelled, before.cancelled + 1);
  },
};

/** Cases for clients that can stream requests (native gRPC over HTTP/2). */
export const streamingRequestCases = {
  async client_streaming(client) {
    const requests = CLIENT_STREAMING_SIZES.map((size) =>
      create(StreamingInputCallRequestSchema, { payload: zeroPayload(size) }),
    );
    const outcome = await client.clientStream(methods.streamingInputCall, each(requests));
    assertOk(outcome);
    assert.equal(outcome.messages[0].aggregatedPayloadSize, 74_922);
  },

  async ping_pong(client) {
    const requests = PING_PONG_SIZES.map(([responseSize, requestSize]) =>
      streamingRequest([responseSize], { payloadSize: requestSize }),
    );
    const outcome = await client.bidi(methods.fullDuplexCall, each(requests));
    assertOk(outcome);
    assert.deepEqual(
      outcome.messages.map(payloadSize),
      PING_PONG_SIZES.map(([responseSize]) => responseSize),
    );
  },

  async custom_metadata_full_duplex(client) {
    const request = streamingRequest([LARGE_RESPONSE_SIZE], { payloadSize: LARGE_REQUEST_SIZE });
    const outcome = await client.bidi(methods.fullDuplexCall, each([request]), {
      metadata: echoMetadata,
    });
    assertOk(outcome);
    assert.deepEqual(outcome.messages.map(payloadSize), [LARGE_RESPONSE_SIZE]);
    assertEchoedMetadata(outcome);
  },

  async status_code_and_message_full_duplex(client) {
    const request = statusRequest(StreamingOutputCallRequestSchema, Code.UNKNOWN, STATUS_MESSAGE);
    const outcome = await client.bidi(methods.fullDuplexCall, each([request]));
    assertStatus(outcome, Code.UNKNOWN, STATUS_MESSAGE);
  },
};

/**
 * Registers every case the adapter can run as a node:test test named `<label> <case>`.
 * Tests in one file run one after another, which the stats checks rely on.
 */
export function registerCases(label, client) {
  const all = { ...cases };
  if (client.incremental === false) {
    delete all.cancel_after_first_response;
    Object.assign(all, nonIncrementalCases);
  }
  if (client.clientStream && client.bidi) {
    Object.assign(all, streamingRequestCases);
  }
  for (const [name, run] of Object.entries(all)) {
    test(`${label} ${name}`, { timeout: 20_000 }, () => run(client));
  }
}
