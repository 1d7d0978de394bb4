// Adapter for `@improbable-eng/grpc-web` to the interface in lib/cases.mjs. The library expects
// google-protobuf style classes (`serializeBinary`, `deserializeBinary`); thin wrappers over
// protobuf-es messages provide them. It speaks binary gRPC-Web only, has no deadline option
// (the adapter sends `grpc-timeout` itself, as its users do) and, in Node, runs over the
// node-http transport (HTTP/1.1).

import improbable from "@improbable-eng/grpc-web";
import { NodeHttpTransport } from "@improbable-eng/grpc-web-node-http-transport";
import { fromBinary, toBinary } from "@bufbuild/protobuf";

const { grpc } = improbable;

/** A protobuf-es message dressed as a google-protobuf one. */
function wrap(schema, message) {
  return {
    message,
    serializeBinary: () => toBinary(schema, message),
    toObject: () => message,
  };
}

function definition(method) {
  return {
    methodName: method.name,
    service: { serviceName: method.parent.typeName },
    requestStream: false,
    responseStream: method.methodKind === "server_streaming",
    requestType: { deserializeBinary: (bytes) => wrap(method.input, fromBinary(method.input, bytes)) },
    responseType: { deserializeBinary: (bytes) => wrap(method.output, fromBinary(method.output, bytes)) },
  };
}

function metadataRecord(metadata) {
  const record = {};
  metadata?.forEach((name, values) => {
    record[name.toLowerCase()] = values.join(", ");
  });
  return record;
}

/** An adapter that invokes methods on `host` with `transport` (default: Node's http). */
export function improbableClient(host, transport = NodeHttpTransport()) {
  const call = (method, request, options = {}) =>
    new Promise((resolve) => {
      const outcome = { messages: [], headers: {}, trailers: {}, code: 0, message: "" };
      const metadata = { ...(options.metadata ?? {}) };
      if (options.timeoutMs !== undefined) {
        metadata["grpc-timeout"] = `${options.timeoutMs}m`;
      }
      let finished = false;
      const invocation = grpc.invoke(definition(method), {
        host,
        transport,
        request: wrap(method.input, request),
        metadata,
        onHeaders: (headers) => {
          outcome.headers = metadataRecord(headers);
        },
        onMessage: (response) => {
          outcome.messages.push(response.message);
          options.onMessage?.(response.message);
          if (options.cancelAfter !== undefined && outcome.messages.length >= options.cancelAfter) {
            // close() aborts the request; onEnd is not called afterwards.
            invocation.close();
            outcome.code = grpc.Code.Canceled;
            outcome.message = "cancelled by the client";
            finished = true;
            resolve(outcome);
          }
        },
        onEnd: (code, message, trailers) => {
          if (finished) {
            return;
          }
          outcome.code = code;
          outcome.message = message;
          outcome.trailers = metadataRecord(trailers);
          resolve(outcome);
        },
      });
    });
  return { unary: call, serverStream: call };
}
