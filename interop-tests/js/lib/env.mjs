// What the Rust driver (interop-tests/tests/*.rs) tells a Node suite through the environment,
// and the upstream's counters, read over HTTP from the driver's stats endpoint.

/** An environment variable the Rust driver must set; throws (failing the suite) if absent. */
export function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run this suite through cargo test -p pnp-interop-tests`);
  }
  return value;
}

/** The proxy's base URL, e.g. `http://127.0.0.1:41234`. */
export function proxyUrl() {
  return required("PNP_URL");
}

/**
 * The transport pnp's egress names in `x-pnp-transport`: `PNP_TRANSPORT` when the driver set
 * it (a bridge over `h1` or `h3`), else `h2`.
 */
export function expectedTransport() {
  return process.env.PNP_TRANSPORT || "h2";
}

/** The demo upstream's counters: `{started, cancelled, active}`. */
export async function upstreamStats() {
  const response = await fetch(required("PNP_STATS_URL"));
  if (!response.ok) {
    throw new Error(`stats endpoint answered HTTP ${response.status}`);
  }
  return response.json();
}

/**
 * Polls the upstream's counters until `predicate` holds; returns the last reading, or throws
 * with it after `timeoutMs`.
 */
export async function waitForStats(predicate, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  let stats = await upstreamStats();
  while (!predicate(stats)) {
    if (Date.now() > deadline) {
      throw new Error(`upstream never saw ${what} within ${timeoutMs} ms: ${JSON.stringify(stats)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
    stats = await upstreamStats();
  }
  return stats;
}
