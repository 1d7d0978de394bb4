// Builds pnp's demo page: crates/proxy/site/src -> crates/proxy/site/dist (committed; the
// proxy embeds it with include_bytes!, so building pnp needs no npm).
//
//   node scripts/build-site.mjs            rebuild crates/proxy/site/dist
//   node scripts/build-site.mjs --out DIR  build into DIR instead (the freshness test)
//   node scripts/build-site.mjs --check    type-check with tsc first
//
// Message code comes from gen/ (`npm run generate`), packages from this project's
// node_modules. The output is deterministic: same inputs, same bytes.

import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const project = resolve(here, "..");
const site = resolve(project, "../../crates/proxy/site");

const args = process.argv.slice(2);
const outIndex = args.indexOf("--out");
const out = outIndex >= 0 ? resolve(args[outIndex + 1]) : join(site, "dist");

if (args.includes("--check")) {
  execFileSync(process.execPath, [join(project, "node_modules/typescript/bin/tsc"), "-p", join(project, "tsconfig.site.json")], {
    stdio: "inherit",
  });
}

mkdirSync(out, { recursive: true });

const common = {
  bundle: true,
  minify: true,
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
  absWorkingDir: site,
};

await esbuild.build({
  ...common,
  entryPoints: [join(site, "src/main.ts")],
  outfile: join(out, "app.js"),
  format: "esm",
  target: "es2020",
  alias: { "@gen": join(project, "gen") },
  nodePaths: [join(project, "node_modules")],
});

await esbuild.build({
  ...common,
  entryPoints: [join(site, "src/style.css")],
  outfile: join(out, "app.css"),
});

copyFileSync(join(site, "src/index.html"), join(out, "index.html"));
console.log(`demo page built into ${out}`);
