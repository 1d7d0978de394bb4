// pnp in a real browser: Debian's Chromium, headless, driven by playwright-core.
// interop-tests/tests/browser.rs starts the proxies and runs this file with:
//   PNP_URL         pnp over HTTP/1.1 + h2c (browsers use HTTP/1.1 on cleartext)
//   PNP_TLS_URL     pnp over TLS (ALPN h2) with a test certificate, PNP_TLS_CERT its PEM file
//   PNP_DEAD_URL    pnp in front of a port where nothing listens
//   PNP_STATS_URL   the demo upstream's counters (shared by PNP_URL and PNP_TLS_URL)
//   PNP_ARTIFACTS   where screenshots go
//   CHROMIUM        the browser binary (default /usr/bin/chromium)
//
// The gRPC-Web calls come from a test page (browser/page.mjs) served by this script from its
// own port: another origin than pnp, so every call needs CORS and a preflight. The demo page
// is loaded from pnp itself.

import assert from "node:assert/strict";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";
import { chromium } from "playwright-core";

import { required, upstreamStats, waitForStats } from "../lib/env.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const PNP_URL = required("PNP_URL");
const PNP_TLS_URL = required("PNP_TLS_URL");
const PNP_DEAD_URL = required("PNP_DEAD_URL");
const ARTIFACTS = required("PNP_ARTIFACTS");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const CANCEL_OBSERVED_WITHIN_MS = 3_000;

/** base64(SHA-256(SubjectPublicKeyInfo)) of the test certificate, for Chromium's allow-list. */
function spkiHash(pemPath) {
  const certificate = new X509Certificate(readFileSync(pemPath));
  const spki = certificate.publicKey.export({ type: "spki", format: "der" });
  return createHash("sha256").update(spki).digest("base64");
}

let browser;
let userDataDir;
let pageServer;
let pageOrigin;

before(async () => {
  const bundle = await esbuild.build({
    entryPoints: [join(here, "page.mjs")],
    bundle: true,
    format: "esm",
    target: "es2020",
    write: false,
    logLevel: "warning",
  });
  const script = bundle.outputFiles[0].contents;
  const html = `<!doctype html><meta charset="utf-8"><title>pnp browser tests</title>
<body><script type="module" src="/page.js"></script></body>`;
  pageServer = createServer((request, response) => {
    if (request.url === "/page.js") {
      response.writeHead(200, { "content-type": "text/javascript" }).end(script);
    } else if (request.url === "/") {
      response.writeHead(200, { "content-type": "text/html" }).end(html);
    } else if (request.url === "/favicon.ico") {
      response.writeHead(204).end();
    } else {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => pageServer.listen(0, "127.0.0.1", resolve));
  pageOrigin = `http://127.0.0.1:${pageServer.address().port}`;

  userDataDir = mkdtempSync(join(tmpdir(), "pnp-chromium-"));
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1100, height: 900 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
      // Trust exactly the test certificate's key (not every certificate).
      `--ignore-certificate-errors-spki-list=${spkiHash(required("PNP_TLS_CERT"))}`,
    ],
  });
  browser.setDefaultTimeout(15_000);
});

after(async () => {
  await browser?.close();
  pageServer?.close();
  if (userDataDir) {
    rmSync(userDataDir, { recursive: true, force: true });
  }
});

/**
 * A fresh tab with the CDP network log on (protocol of each response, preflights) and page
 * errors collected; `url` defaults to the cross-origin test page.
 */
async function openPage(url = `${pageOrigin}/`) {
  const page = await browser.newPage();
  const network = [];
  const problems = [];
  page.on("pageerror", (error) => problems.push(`pageerror: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") {
      problems.push(`console: ${message.text()}`);
    }
  });
  const cdp = await browser.newCDPSession(page);
  await cdp.send("Network.enable");
  // As with DevTools' "Disable cache": this also skips Chromium's CORS preflight cache, so
  // every test's calls are preflighted again, not only the first test's.
  await cdp.send("Network.setCacheDisabled", { cacheDisabled: true });
  const methods = new Map();
  cdp.on("Network.requestWillBeSent", (event) => {
    methods.set(event.requestId, event.request.method);
  });
  cdp.on("Network.responseReceived", (event) => {
    network.push({
      url: event.response.url,
      method: methods.get(event.requestId),
      type: event.type,
      status: event.response.status,
      protocol: event.response.protocol,
    });
  });
  await page.goto(url);
  if (url.startsWith(pageOrigin)) {
    await page.waitForSelector("body[data-ready=true]", { state: "attached" });
  }
  return { page, network, problems };
}

/** Waits (up to 5 s) until `predicate()` holds: CDP events trail the calls a little. */
async function eventually(predicate, describe) {
  const deadline = Date.now() + 5_000;
  while (!predicate()) {
    if (Date.now() > deadline) {
      assert.fail(describe());
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const call = (page, fn, ...args) => page.evaluate(([fn, args]) => window.pnpTest[fn](...args), [fn, args]);

const ECHO_METADATA = {
  "x-grpc-test-echo-initial": "test_initial_metadata_value",
  "x-grpc-test-echo-trailing-bin": "q6ur",
};
const SPECIAL = "\t\ntest with whitespace\r\nand Unicode BMP \u263A and non-BMP \u{1F608}\t\n";

/** Arrival-time checks on a stream of `count` tokens paced `intervalMs` apart. */
function assertIncremental(result, count, intervalMs) {
  assert.equal(result.code, 0, result.message);
  assert.deepEqual(
    result.tokens.map((t) => t.index),
    [...Array(count).keys()],
  );
  assert.equal(result.tokens.at(-1).done, true);
  const gaps = result.tokens.slice(1).map((t, i) => t.at - result.tokens[i].at);
  // Each token is seen on its own, about intervalMs after the one before: none were held
  // back and delivered in a batch. (A third of the interval leaves room for a busy machine.)
  assert.ok(
    gaps.every((gap) => gap > intervalMs / 3),
    `arrival gaps ${gaps.map(Math.round).join(", ")} ms; expected each > ${intervalMs / 3}`,
  );
}

describe("cross-origin gRPC-Web from Chromium over HTTP/1.1", () => {
  for (const kind of ["connect-web", "grpc-web-text", "grpc-web-binary"]) {
    test(`${kind}: unary calls, CORS preflight, metadata and status readable`, async () => {
      const { page, network, problems } = await openPage();
      const empty = await call(page, "unary", kind, PNP_URL, "empty");
      assert.equal(empty.code, 0, empty.message);
      assert.equal(empty.count, 1);
      assert.equal(empty.headers["x-pnp-transport"], "h2");

      const large = await call(page, "unary", kind, PNP_URL, "large", [], { metadata: ECHO_METADATA });
      assert.equal(large.code, 0, large.message);
      assert.equal(large.payloadSize, 314_159);
      assert.equal(large.headers["x-grpc-test-echo-initial"], "test_initial_metadata_value");
      assert.equal(large.trailers["x-grpc-test-echo-trailing-bin"].replace(/=+$/, ""), "q6ur");

      const status = await call(page, "unary", kind, PNP_URL, "status", [2, SPECIAL]);
      assert.deepEqual([status.code, status.message], [2, SPECIAL]);

      const toPnp = (method) => network.filter((r) => r.method === method && r.url.startsWith(PNP_URL));
      await eventually(
        () => toPnp("POST").length === 3 && toPnp("OPTIONS").length === 3,
        () => `expected 3 preflights and 3 calls to pnp: ${JSON.stringify(network)}`,
      );
      for (const preflight of toPnp("OPTIONS")) {
        assert.equal(preflight.type, "Preflight");
        assert.ok(preflight.status >= 200 && preflight.status < 300, JSON.stringify(preflight));
      }
      assert.ok(toPnp("POST").every((r) => r.protocol === "http/1.1"), JSON.stringify(network));
      assert.deepEqual(problems, []);
      await page.close();
    });
  }

  for (const kind of ["connect-web", "grpc-web-text"]) {
    test(`${kind}: server stream arrives token by token`, async () => {
      const { page } = await openPage();
      const result = await call(page, "generate", kind, PNP_URL, {
        prompt: "incremental",
        maxTokens: 8,
        seed: 7,
        firstTokenDelayMs: 50,
        tokenIntervalMs: 150,
      });
      assertIncremental(result, 8, 150);
      await page.close();
    });
  }

  test("grpc-web-binary: a server stream arrives whole, when it ends (XHR ArrayBuffer)", async () => {
    const { page } = await openPage();
    const result = await call(page, "generate", "grpc-web-binary", PNP_URL, {
      prompt: "binary",
      maxTokens: 8,
      seed: 7,
      firstTokenDelayMs: 50,
      tokenIntervalMs: 150,
    });
    assert.equal(result.code, 0, result.message);
    assert.equal(result.tokens.length, 8);
    const spread = result.tokens.at(-1).at - result.tokens[0].at;
    assert.ok(result.tokens[0].at >= 7 * 150, `first token seen after ${result.tokens[0].at} ms`);
    assert.ok(spread < 100, `tokens seen over ${spread} ms`);
    await page.close();
  });

  for (const kind of ["connect-web", "grpc-web-text"]) {
    test(`${kind}: aborting a stream cancels the upstream call`, async () => {
      const { page } = await openPage();
      const before = await upstreamStats();
      const result = await call(
        page,
        "generate",
        kind,
        PNP_URL,
        { prompt: "stop me", maxTokens: 500, firstTokenDelayMs: 10, tokenIntervalMs: 100 },
        { cancelAfter: 2 },
      );
      assert.equal(result.code, 1, result.message);
      assert.equal(result.tokens.length, 2);
      const after = await waitForStats(
        (s) => s.cancelled > before.cancelled && s.active === 0,
        CANCEL_OBSERVED_WITHIN_MS,
        "the browser's abort",
      );
      assert.equal(after.cancelled, before.cancelled + 1);
      await page.close();
    });
  }

  for (const kind of ["connect-web", "grpc-web-text", "grpc-web-binary"]) {
    test(`${kind}: errors pnp makes are readable cross-origin`, async () => {
      const { page } = await openPage();
      // The deadline runs out at pnp while the model still "thinks". Sent as the header
      // itself: Connect's own timeoutMs would also start a timer in the page, which could
      // end the call before pnp's answer is read.
      const late = await call(
        page,
        "generate",
        kind,
        PNP_URL,
        { prompt: "too slow", maxTokens: 4, firstTokenDelayMs: 5_000 },
        { metadata: { "grpc-timeout": "300m" } },
      );
      assert.equal(late.code, 4, late.message);
      assert.match(late.message, /^pnp: deadline exceeded/);
      assert.equal(late.tokens.length, 0);

      // No upstream at all: pnp answers UNAVAILABLE itself.
      const dead = await call(page, "unary", kind, PNP_DEAD_URL, "empty");
      assert.equal(dead.code, 14, dead.message);
      assert.match(dead.message, /upstream/);

      // Unknown method and service: UNIMPLEMENTED, through pnp.
      for (const which of ["unimplementedMethod", "unimplementedService"]) {
        const unknown = await call(page, "unary", kind, PNP_URL, which);
        assert.equal(unknown.code, 12, `${which}: ${unknown.message}`);
      }
      await page.close();
    });
  }
});

describe("gRPC-Web from Chromium over HTTP/2 with TLS", () => {
  for (const kind of ["connect-web", "grpc-web-text", "grpc-web-binary"]) {
    test(`${kind}: unary over h2`, async () => {
      const { page, network, problems } = await openPage();
      const empty = await call(page, "unary", kind, PNP_TLS_URL, "empty");
      assert.equal(empty.code, 0, empty.message);
      assert.equal(empty.headers["x-pnp-transport"], "h2");
      const large = await call(page, "unary", kind, PNP_TLS_URL, "large");
      assert.equal(large.payloadSize, 314_159);
      const calls = () => network.filter((r) => r.method === "POST" && r.url.startsWith(PNP_TLS_URL));
      await eventually(
        () => calls().length === 2,
        () => `expected 2 calls to pnp: ${JSON.stringify(network)}`,
      );
      assert.ok(calls().every((r) => r.protocol === "h2"), JSON.stringify(network));
      assert.deepEqual(problems, []);
      await page.close();
    });
  }

  for (const kind of ["connect-web", "grpc-web-text"]) {
    test(`${kind}: server stream over h2 arrives token by token, abort cancels upstream`, async () => {
      const { page } = await openPage();
      const result = await call(page, "generate", kind, PNP_TLS_URL, {
        prompt: "tls",
        maxTokens: 6,
        seed: 9,
        firstTokenDelayMs: 50,
        tokenIntervalMs: 150,
      });
      assertIncremental(result, 6, 150);

      const before = await upstreamStats();
      const stopped = await call(
        page,
        "generate",
        kind,
        PNP_TLS_URL,
        { prompt: "stop me", maxTokens: 500, firstTokenDelayMs: 10, tokenIntervalMs: 100 },
        { cancelAfter: 1 },
      );
      assert.equal(stopped.code, 1, stopped.message);
      await waitForStats(
        (s) => s.cancelled > before.cancelled && s.active === 0,
        CANCEL_OBSERVED_WITHIN_MS,
        "the browser's abort over h2",
      );
      await page.close();
    });
  }
});

describe("the demo page served by pnp", () => {
  async function fillAdvanced(page, fields) {
    await page.click(".advanced summary");
    for (const [selector, value] of Object.entries(fields)) {
      if (selector === "#deadline") {
        await page.selectOption(selector, value);
      } else {
        await page.fill(selector, value);
      }
    }
  }

  test("streams tokens live with TTFT, tokens/s and transport; Stop cancels upstream", async () => {
    const { page, network, problems } = await openPage(`${PNP_URL}/`);
    assert.equal(await page.title(), "pnp · token streaming demo");
    await page.fill("#prompt", "Why does a streaming LLM front end need its own proxy?");
    await page.fill("#max-tokens", "400");
    await fillAdvanced(page, { "#token-interval": "90", "#seed": "7" });
    const before = await upstreamStats();
    await page.click("#generate");
    await page.waitForFunction(() => document.querySelectorAll("#output .tok").length >= 24, null, {
      timeout: 20_000,
    });
    await page.screenshot({ path: join(ARTIFACTS, "demo-mid-stream.png"), fullPage: true });

    assert.equal(await page.getAttribute("#state", "data-state"), "streaming");
    const tokens = await page.$$eval("#output .tok", (spans) => spans.map((s) => s.textContent));
    assert.ok(tokens.length >= 24 && tokens.every((t) => t.trim().length > 0), JSON.stringify(tokens));
    assert.ok(await page.isVisible("#output .tok >> nth=0"), "first token not visible");
    assert.match(await page.textContent("#ttft"), /^\d+ ms$|^\d+\.\d\d s$/);
    assert.ok(Number(await page.textContent("#rate")) > 1, "tokens/s");
    assert.equal(await page.textContent("#transport"), "h2");
    assert.equal(await page.textContent("#route-egress"), "gRPC · h2");
    assert.ok(Number(await page.textContent("#count")) >= 24);

    await page.click("#stop");
    await page.waitForSelector('#state[data-state="stopped"]');
    assert.equal(await page.isHidden("#error"), true);
    const after = await waitForStats(
      (s) => s.cancelled > before.cancelled && s.active === 0,
      CANCEL_OBSERVED_WITHIN_MS,
      "the Stop button",
    );
    assert.equal(after.cancelled, before.cancelled + 1);
    assert.equal(await page.textContent("#route-ingress"), "gRPC-Web · HTTP/1.1");
    // Same origin: no preflight; nothing blocked by the page's CSP.
    assert.deepEqual(network.filter((r) => r.method === "OPTIONS"), []);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("finishes a generation and reports why it stopped", async () => {
    const { page, problems } = await openPage(`${PNP_URL}/`);
    await page.fill("#max-tokens", "20");
    await page.selectOption("#model-class", "classifier");
    await page.click("#generate");
    await page.waitForSelector('#state[data-state="done"]', { timeout: 20_000 });
    assert.equal(await page.textContent("#state"), "Done · length");
    assert.equal(await page.textContent("#count"), "20");
    assert.equal(await page.$$eval("#output .tok", (spans) => spans.length), 20);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("shows a deadline error with its gRPC status", async () => {
    const { page } = await openPage(`${PNP_URL}/`);
    await fillAdvanced(page, { "#deadline": "500", "#token-interval": "400" });
    await page.fill("#max-tokens", "50");
    await page.click("#generate");
    await page.waitForSelector('#state[data-state="error"]', { timeout: 20_000 });
    assert.equal(await page.textContent("#error-code"), "DEADLINE_EXCEEDED (4)");
    assert.match(await page.textContent("#error-message"), /deadline/i);
    await page.screenshot({ path: join(ARTIFACTS, "demo-deadline-error.png") });
    await page.close();
  });

  test("shows UNAVAILABLE when pnp has no upstream", async () => {
    const { page } = await openPage(`${PNP_DEAD_URL}/`);
    await page.click("#generate");
    await page.waitForSelector('#state[data-state="error"]', { timeout: 20_000 });
    assert.equal(await page.textContent("#error-code"), "UNAVAILABLE (14)");
    assert.match(await page.textContent("#error-message"), /upstream/);
    await page.close();
  });

  test("works over HTTP/2 with TLS", async () => {
    const { page, problems } = await openPage(`${PNP_TLS_URL}/`);
    await page.fill("#max-tokens", "12");
    await page.selectOption("#model-class", "classifier");
    await page.click("#generate");
    await page.waitForSelector('#state[data-state="done"]', { timeout: 20_000 });
    assert.equal(await page.textContent("#count"), "12");
    assert.equal(await page.textContent("#route-ingress"), "gRPC-Web · HTTP/2");
    assert.equal(await page.textContent("#transport"), "h2");
    assert.deepEqual(problems, []);
    await page.close();
  });
});
