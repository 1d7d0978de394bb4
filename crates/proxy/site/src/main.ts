// The pnp demo page: streams tokens from demo.llm.v1.Generator/Generate through gRPC-Web
// (binary, over fetch, with @connectrpc/connect-web) on the origin that served the page, and
// shows them as they arrive with time to first token, tokens per second, the transport pnp
// used upstream (`x-pnp-transport`) and any error with its gRPC status.
//
// Bundled by interop-tests/js/scripts/build-site.mjs into ../dist, which pnp embeds.

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { GenerateRequestSchema, Generator } from "@gen/demo/llm/v1/generator_pb.js";

/** Canonical gRPC status names, indexed by code. */
const STATUS_NAMES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

type State = "idle" | "waiting" | "streaming" | "done" | "stopped" | "error";

const STATE_LABELS: Record<State, string> = {
  idle: "Idle",
  waiting: "Waiting for the first token…",
  streaming: "Streaming",
  done: "Done",
  stopped: "Stopped",
  error: "Failed",
};

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) {
    throw new Error(`missing #${id}`);
  }
  return found as T;
}

const ui = {
  form: element<HTMLFormElement>("composer"),
  prompt: element<HTMLTextAreaElement>("prompt"),
  maxTokens: element<HTMLInputElement>("max-tokens"),
  modelClass: element<HTMLSelectElement>("model-class"),
  timeScale: element<HTMLSelectElement>("time-scale"),
  deadline: element<HTMLSelectElement>("deadline"),
  tokenInterval: element<HTMLInputElement>("token-interval"),
  failAfter: element<HTMLInputElement>("fail-after"),
  seed: element<HTMLInputElement>("seed"),
  generate: element<HTMLButtonElement>("generate"),
  stop: element<HTMLButtonElement>("stop"),
  state: element<HTMLSpanElement>("state"),
  requestId: element<HTMLSpanElement>("request-id"),
  output: element<HTMLDivElement>("output"),
  error: element<HTMLDivElement>("error"),
  errorCode: element<HTMLSpanElement>("error-code"),
  errorMessage: element<HTMLSpanElement>("error-message"),
  ttft: element<HTMLSpanElement>("ttft"),
  rate: element<HTMLSpanElement>("rate"),
  count: element<HTMLSpanElement>("count"),
  elapsed: element<HTMLSpanElement>("elapsed"),
  transport: element<HTMLSpanElement>("transport"),
  routeIngress: element<HTMLSpanElement>("route-ingress"),
  routeEgress: element<HTMLSpanElement>("route-egress"),
};

const transport = createGrpcWebTransport({ baseUrl: window.location.origin, useBinaryFormat: true });
const generator = createClient(Generator, transport);

/** The call in flight, if any. */
let current: { abort: AbortController } | undefined;

function setState(state: State): void {
  ui.state.dataset.state = state;
  ui.state.textContent = STATE_LABELS[state];
  const running = state === "waiting" || state === "streaming";
  ui.generate.disabled = running;
  ui.stop.disabled = !running;
  document.body.classList.toggle("running", running);
}

function optionalNumber(input: HTMLInputElement | HTMLSelectElement): number | undefined {
  const text = input.value.trim();
  if (text === "") {
    return undefined;
  }
  const value = Number(text);
  return Number.isFinite(value) && value >= 0 ? Math.floor(value) : undefined;
}

function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** The HTTP version the browser used to reach pnp for the last Generate call. */
function pageProtocol(): string {
  const entries = performance.getEntriesByType("resource") as PerformanceResourceTiming[];
  const call = entries.filter((e) => e.name.includes("/demo.llm.v1.Generator/Generate")).pop();
  const navigation = performance.getEntriesByType("navigation")[0] as PerformanceNavigationTiming | undefined;
  const protocol = call?.nextHopProtocol || navigation?.nextHopProtocol || "";
  return protocol === "h2" ? "HTTP/2" : protocol === "h3" ? "HTTP/3" : protocol ? "HTTP/1.1" : "";
}

function showError(code: number, message: string): void {
  ui.errorCode.textContent = `${STATUS_NAMES[code] ?? `CODE ${code}`} (${code})`;
  ui.errorMessage.textContent = message || "(no message)";
  ui.error.hidden = false;
}

function resetOutput(): void {
  ui.output.replaceChildren();
  ui.error.hidden = true;
  ui.ttft.textContent = "–";
  ui.rate.textContent = "–";
  ui.count.textContent = "0";
  ui.elapsed.textContent = "–";
  ui.transport.textContent = "–";
  ui.requestId.textContent = "";
}

async function generate(): Promise<void> {
  if (current) {
    return;
  }
  resetOutput();
  const abort = new AbortController();
  const started = performance.now();
  let firstAt: number | undefined;
  let lastAt: number | undefined;
  let tokens = 0;

  const tick = (): void => {
    const now = lastAt !== undefined && !current ? lastAt : performance.now();
    ui.elapsed.textContent = formatMs(now - started);
    if (firstAt !== undefined && lastAt !== undefined && tokens > 1 && lastAt > firstAt) {
      ui.rate.textContent = ((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(1);
    }
  };
  const timer = window.setInterval(tick, 100);
  current = { abort };
  setState("waiting");

  const caret = document.createElement("span");
  caret.className = "caret";
  ui.output.append(caret);

  const seed = optionalNumber(ui.seed);
  const request = create(GenerateRequestSchema, {
    prompt: ui.prompt.value,
    maxTokens: optionalNumber(ui.maxTokens) ?? 0,
    modelClass: ui.modelClass.value,
    timeScale: Number(ui.timeScale.value) || 1,
    tokenIntervalMs: optionalNumber(ui.tokenInterval),
    failAfterTokens: optionalNumber(ui.failAfter),
    seed: seed === undefined ? undefined : BigInt(seed),
  });
  const deadline = optionalNumber(ui.deadline);

  let finishReason = "";
  try {
    const responses = generator.generate(request, {
      signal: abort.signal,
      // The deadline goes to pnp as `grpc-timeout`, and pnp enforces it: the page shows the
      // status pnp sends (Connect's timeoutMs would race it with a timer of its own).
      headers: deadline === undefined ? {} : { "grpc-timeout": `${deadline}m` },
      onHeader: (headers) => {
        const egress = headers.get("x-pnp-transport");
        if (egress) {
          ui.transport.textContent = egress;
          ui.routeEgress.textContent = `gRPC · ${egress}`;
        }
        const id = headers.get("x-request-id");
        if (id) {
          ui.requestId.textContent = `request ${id}`;
        }
      },
    });
    for await (const response of responses) {
      const now = performance.now();
      if (firstAt === undefined) {
        firstAt = now;
        ui.ttft.textContent = formatMs(now - started);
        setState("streaming");
      }
      lastAt = now;
      tokens += 1;
      const token = document.createElement("span");
      token.className = "tok";
      token.textContent = response.text;
      caret.before(token);
      ui.count.textContent = String(tokens);
      if (response.done) {
        finishReason = response.finishReason;
      }
    }
    setState("done");
    if (finishReason) {
      ui.state.textContent = `Done · ${finishReason}`;
    }
  } catch (thrown) {
    const error = ConnectError.from(thrown);
    if (error.code === Code.Canceled && abort.signal.aborted) {
      setState("stopped");
    } else {
      setState("error");
      showError(error.code, error.rawMessage);
      if (tokens === 0) {
        const none = document.createElement("span");
        none.className = "placeholder";
        none.textContent = "No tokens arrived before the call ended.";
        ui.output.append(none);
      }
    }
  } finally {
    window.clearInterval(timer);
    current = undefined;
    caret.remove();
    lastAt = lastAt ?? performance.now();
    tick();
    if (tokens === 0 && firstAt === undefined) {
      ui.rate.textContent = "–";
    }
    const protocol = pageProtocol();
    if (protocol) {
      ui.routeIngress.textContent = `gRPC-Web · ${protocol}`;
    }
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  void generate();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.metaKey || event.ctrlKey)) {
    event.preventDefault();
    void generate();
  }
});

ui.stop.addEventListener("click", () => {
  current?.abort.abort();
});

const initialProtocol = pageProtocol();
if (initialProtocol) {
  ui.routeIngress.textContent = `gRPC-Web · ${initialProtocol}`;
}
setState("idle");
