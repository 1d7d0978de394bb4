// The interop cases through pnp with one real client library in one mode, picked by
// PNP_CLIENT. interop-tests/tests/js_clients.rs starts the proxy and runs this file once per
// client and mode; see lib/cases.mjs for the cases.

import { createGrpcWebTransport as createWebFetchTransport } from "@connectrpc/connect-web";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";

import { registerCases } from "../lib/cases.mjs";
import { connectClient } from "../lib/clients/connect.mjs";
import { grpcWebClient } from "../lib/clients/grpc_web.mjs";
import { improbableClient } from "../lib/clients/improbable.mjs";
import { proxyUrl, required } from "../lib/env.mjs";
import { StreamingXMLHttpRequest } from "../lib/streaming_xhr.mjs";

const baseUrl = proxyUrl();

const clients = {
  // Google's grpc-web runtime drives an XMLHttpRequest; in Node xhr2 provides one (as in
  // grpc-web's own Node tests), made to stream like a browser's (lib/streaming_xhr.mjs).
  "grpc-web-text": () => {
    globalThis.XMLHttpRequest = StreamingXMLHttpRequest;
    return grpcWebClient(baseUrl, "text");
  },
  "grpc-web-binary": () => {
    globalThis.XMLHttpRequest = StreamingXMLHttpRequest;
    return grpcWebClient(baseUrl, "binary");
  },
  // connect-web's transport over Node's own fetch (undici, HTTP/1.1), as in a browser.
  "connect-web": () =>
    connectClient(createWebFetchTransport({ baseUrl, useBinaryFormat: true, fetch: globalThis.fetch })),
  "connect-node-web-h1": () =>
    connectClient(createGrpcWebTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true })),
  // h2c with prior knowledge: pnp serves HTTP/1.1 and HTTP/2 on one cleartext port.
  "connect-node-web-h2": () =>
    connectClient(createGrpcWebTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true })),
  "connect-node-grpc": () =>
    connectClient(createGrpcTransport({ baseUrl, httpVersion: "2" }), { streamingRequests: true }),
  improbable: () => improbableClient(baseUrl),
};

const name = required("PNP_CLIENT");
const make = clients[name];
if (!make) {
  throw new Error(`unknown PNP_CLIENT ${name}; one of ${Object.keys(clients).join(", ")}`);
}
registerCases(name, make());
