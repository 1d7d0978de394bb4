// Adapter for Connect clients (`@connectrpc/connect` with a connect-web or connect-node
// transport) to the interface in lib/cases.mjs.

import { ConnectError, createClient } from "@connectrpc/connect";

function headerRecord(headers) {
  const record = {};
  headers?.forEach((value, name) => {
    record[name.toLowerCase()] = value;
  });
  return record;
}

/** Runs `call(options)` and folds what Connect reports (or throws) into an Outcome. */
async function outcomeOf(call, options, collect) {
  const outcome = { messages: [], headers: {}, trailers: {}, code: 0, message: "" };
  const controller = new AbortController();
  const callOptions = {
    headers: options.metadata ?? {},
    timeoutMs: options.timeoutMs,
    signal: controller.signal,
    onHeader: (headers) => {
      outcome.headers = headerRecord(headers);
    },
    onTrailer: (trailers) => {
      outcome.trailers = headerRecord(trailers);
    },
  };
  try {
    await collect(call(callOptions), outcome.messages, controller);
  } catch (error) {
    const connectError = ConnectError.from(error);
    outcome.code = connectError.code;
    outcome.message = connectError.rawMessage;
    // A Connect error carries the response headers and trailers merged; a Trailers-Only
    // response has them in one block, so both views get the whole set.
    const metadata = headerRecord(connectError.metadata);
    outcome.trailers = { ...metadata, ...outcome.trailers };
    outcome.headers = { ...metadata, ...outcome.headers };
  }
  return outcome;
}

async function collectStream(responses, messages, controller, options) {
  if (options.cancelAfterMs !== undefined) {
    setTimeout(() => controller.abort(), options.cancelAfterMs);
  }
  for await (const response of responses) {
    messages.push(response);
    options.onMessage?.(response);
    if (options.cancelAfter !== undefined && messages.length >= options.cancelAfter) {
      controller.abort();
    }
  }
}

/** An adapter over a Connect `transport`; `streamingRequests` when it can stream requests. */
export function connectClient(transport, { streamingRequests = false } = {}) {
  const rpc = (method) => createClient(method.parent, transport)[method.localName];
  const client = {
    unary(method, request, options = {}) {
      return outcomeOf(
        (callOptions) => rpc(method)(request, callOptions),
        options,
        async (pending, messages) => {
          messages.push(await pending);
        },
      );
    },
    serverStream(method, request, options = {}) {
      return outcomeOf(
        (callOptions) => rpc(method)(request, callOptions),
        options,
        (responses, messages, controller) =>
          collectStream(responses, messages, controller, options),
      );
    },
  };
  if (streamingRequests) {
    client.clientStream = (method, requests, options = {}) =>
      outcomeOf(
        (callOptions) => rpc(method)(requests, callOptions),
        options,
        async (pending, messages) => {
          messages.push(await pending);
        },
      );
    client.bidi = (method, requests, options = {}) =>
      outcomeOf(
        (callOptions) => rpc(method)(requests, callOptions),
        options,
        (responses, messages, controller) =>
          collectStream(responses, messages, controller, options),
      );
  }
  return client;
}
