// The cross-origin test page of the browser suite (browser/browser.test.mjs bundles it with
// esbuild and serves it from its own port, so every call to pnp is cross-origin and goes
// through CORS preflight). It puts `window.pnpTest` on the page: functions that make calls with
// a real gRPC-Web client library and return plain-data summaries, including when each
// message arrived as the page saw it (performance.now()).

import { create } from "@bufbuild/protobuf";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { GenerateRequestSchema, Generator } from "../gen/demo/llm/v1/generator_pb.js";
import { EmptySchema } from "../gen/grpc/testing/empty_pb.js";
import { EchoStatusSchema, PayloadSchema, SimpleRequestSchema } from "../gen/grpc/testing/messages_pb.js";
import { TestService, UnimplementedService } from "../gen/grpc/testing/test_pb.js";
import { connectClient } from "../lib/clients/connect.mjs";
import { grpcWebClient } from "../lib/clients/grpc_web.mjs";

/** A client library in one mode, talking to `baseUrl`. */
function client(kind, baseUrl) {
  switch (kind) {
    case "connect-web":
      return connectClient(createGrpcWebTransport({ baseUrl, useBinaryFormat: true }));
    case "grpc-web-text":
      return grpcWebClient(baseUrl, "text");
    case "grpc-web-binary":
      return grpcWebClient(baseUrl, "binary");
    default:
      throw new Error(`unknown client ${kind}`);
  }
}

function summary(outcome) {
  return {
    code: outcome.code,
    message: outcome.message,
    headers: outcome.headers,
    trailers: outcome.trailers,
    count: outcome.messages.length,
  };
}

const unaryMethods = {
  empty: [TestService.method.emptyCall, () => create(EmptySchema)],
  large: [
    TestService.method.unaryCall,
    () =>
      create(SimpleRequestSchema, {
        responseSize: 314_159,
        payload: create(PayloadSchema, { body: new Uint8Array(271_828) }),
      }),
  ],
  status: [
    TestService.method.unaryCall,
    (code, message) => create(SimpleRequestSchema, { responseStatus: create(EchoStatusSchema, { code, message }) }),
  ],
  unimplementedMethod: [TestService.method.unimplementedCall, () => create(EmptySchema)],
  unimplementedService: [UnimplementedService.method.unimplementedCall, () => create(EmptySchema)],
};

window.pnpTest = {
  /** A unary call; `which` is a key of unaryMethods, `args` go to its request builder. */
  async unary(kind, baseUrl, which, args = [], options = {}) {
    const [method, build] = unaryMethods[which];
    const outcome = await client(kind, baseUrl).unary(method, build(...args), options);
    const result = summary(outcome);
    if (which === "large" && outcome.messages.length === 1) {
      result.payloadSize = outcome.messages[0].payload?.body.length ?? 0;
    }
    return result;
  },

  /**
   * A Generate stream with `request` (GenerateRequest fields); `options` as in
   * lib/cases.mjs. Returns the tokens with the page time each arrived, relative to the start.
   */
  async generate(kind, baseUrl, request, options = {}) {
    const started = performance.now();
    const tokens = [];
    const outcome = await client(kind, baseUrl).serverStream(
      Generator.method.generate,
      create(GenerateRequestSchema, { ...request, seed: request.seed === undefined ? undefined : BigInt(request.seed) }),
      {
        ...options,
        onMessage: (response) => {
          tokens.push({ index: response.index, text: response.text, done: response.done, at: performance.now() - started });
        },
      },
    );
    return { ...summary(outcome), tokens };
  },
};

document.body.dataset.ready = "true";
