// Adapter for the official `grpc-web` runtime (Google's, the one protoc-gen-grpc-web targets)
// to the interface in lib/cases.mjs. Its code generator is a native protoc plugin that cannot
// be installed here, so method descriptors are written by hand over protobuf-es messages:
// that is all the generated client does too (a path, a method type, and two functions).

import * as grpcWeb from "grpc-web";
import { fromBinary, toBinary } from "@bufbuild/protobuf";

function lowerCaseKeys(metadata) {
  const record = {};
  for (const [name, value] of Object.entries(metadata ?? {})) {
    record[name.toLowerCase()] = value;
  }
  return record;
}

/** What `protoc-gen-grpc-web` would emit for `method`. */
function descriptor(method) {
  // The runtime only calls the constructors' prototypes through the serializers below.
  class Request {}
  class Response {}
  return new grpcWeb.MethodDescriptor(
    `/${method.parent.typeName}/${method.name}`,
    method.methodKind === "unary" ? grpcWeb.MethodType.UNARY : grpcWeb.MethodType.SERVER_STREAMING,
    Request,
    Response,
    (message) => toBinary(method.input, message),
    (bytes) => fromBinary(method.output, bytes),
  );
}

function callMetadata(options) {
  const metadata = { ...(options.metadata ?? {}) };
  if (options.timeoutMs !== undefined) {
    // The runtime's own `deadline` metadata (ms since the epoch) becomes `grpc-timeout` only
    // if it is still in the future when the request is sent, which a 1 ms deadline often is
    // not; the interop case wants the 1 ms on the wire, so send the header itself.
    metadata["grpc-timeout"] = `${options.timeoutMs}m`;
  }
  return metadata;
}

/**
 * An adapter over `new GrpcWebClientBase({format})`: `format` is `"text"`
 * (application/grpc-web-text, base64) or `"binary"` (application/grpc-web+proto).
 */
export function grpcWebClient(baseUrl, format) {
  const base = new grpcWeb.GrpcWebClientBase({ format });
  const url = (method) => `${baseUrl}/${method.parent.typeName}/${method.name}`;

  return {
    // Binary mode reads the XHR as an ArrayBuffer, which is readable only once the response
    // has ended: a stream arrives whole, at its end (grpc-web documents server streaming as
    // text-mode only).
    incremental: format === "text",

    unary(method, request, options = {}) {
      return new Promise((resolve) => {
        const outcome = { messages: [], headers: {}, trailers: {}, code: 0, message: "" };
        let pending = 2; // the callback and the 'status' event, in either order
        const settle = () => {
          pending -= 1;
          if (pending === 0) {
            resolve(outcome);
          }
        };
        const call = base.rpcCall(url(method), request, callMetadata(options), descriptor(method), (error, response) => {
          if (error) {
            outcome.code = error.code;
            outcome.message = error.message;
            outcome.trailers = { ...outcome.trailers, ...lowerCaseKeys(error.metadata) };
            // No 'status' event follows an error.
            resolve(outcome);
            return;
          }
          outcome.messages.push(response);
          settle();
        });
        call.on("metadata", (headers) => {
          outcome.headers = lowerCaseKeys(headers);
        });
        call.on("status", (status) => {
          outcome.trailers = lowerCaseKeys(status.metadata);
          settle();
        });
      });
    },

    serverStream(method, request, options = {}) {
      return new Promise((resolve) => {
        const outcome = { messages: [], headers: {}, trailers: {}, code: 0, message: "" };
        let done = false;
        const finish = () => {
          if (!done) {
            done = true;
            resolve(outcome);
          }
        };
        const stream = base.serverStreaming(url(method), request, callMetadata(options), descriptor(method));
        stream.on("metadata", (headers) => {
          outcome.headers = lowerCaseKeys(headers);
        });
        const cancel = () => {
          // cancel() aborts the XHR; the runtime reports nothing more, so the adapter
          // records the status a cancelled call has.
          stream.cancel();
          outcome.code = grpcWeb.StatusCode.CANCELLED;
          outcome.message = "cancelled by the client";
          finish();
        };
        if (options.cancelAfterMs !== undefined) {
          setTimeout(cancel, options.cancelAfterMs);
        }
        stream.on("data", (response) => {
          outcome.messages.push(response);
          options.onMessage?.(response);
          if (options.cancelAfter !== undefined && outcome.messages.length >= options.cancelAfter) {
            cancel();
          }
        });
        stream.on("status", (status) => {
          outcome.trailers = lowerCaseKeys(status.metadata);
          if (status.code !== 0) {
            outcome.code = status.code;
            outcome.message = status.details;
          }
        });
        stream.on("error", (error) => {
          outcome.code = error.code;
          outcome.message = error.message;
          outcome.trailers = { ...outcome.trailers, ...lowerCaseKeys(error.metadata) };
          finish();
        });
        stream.on("end", finish);
      });
    },
  };
}
