//! What the Node, Python and browser drivers share: finding the installed clients (failing with
//! the install command when they are missing), running a child process with a time limit and
//! its output kept for the failure message, a temp dir, and an HTTP endpoint that shows the
//! demo upstream's counters to a child process (so a Node test can see that a cancel it sent
//! reached the upstream).

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

pub mod bridge;
pub mod bulk;
pub mod h3;
pub mod misbehaving;
pub mod negotiation;
pub mod netns;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pnp_demo::DemoStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::task::JoinHandle;

/// The workspace root.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("interop-tests has a parent directory"))
        .to_path_buf()
}

/// `interop-tests/js`, the npm project of the Node clients and the browser tests.
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// `interop-tests/python`, the grpcio client and upstream.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The install step, named in every "missing" failure.
pub const INSTALL_HINT: &str = "install the test dependencies first (see .ci/run): \
     `apt-get install -y chromium`, `npm ci --prefix interop-tests/js`, \
     `pip install -r interop-tests/python/requirements.txt`";

/// Fails the test unless `npm ci --prefix interop-tests/js` has run.
pub fn require_node_modules() {
    let missing: Vec<&str> = [
        "grpc-web",
        "@connectrpc/connect-node",
        "@connectrpc/connect-web",
        "@improbable-eng/grpc-web",
        "@bufbuild/protobuf",
        "@bufbuild/buf",
        "esbuild",
        "playwright-core",
    ]
    .into_iter()
    .filter(|package| {
        !js_dir()
            .join("node_modules")
            .join(package)
            .join("package.json")
            .is_file()
    })
    .collect();
    assert!(
        missing.is_empty(),
        "node packages {missing:?} are not installed in interop-tests/js/node_modules: {INSTALL_HINT}"
    );
}

/// `PATH` with `interop-tests/js/node_modules/.bin` first, for tools that start npm binaries
/// (`buf` runs `protoc-gen-es`).
pub fn path_with_npm_bin() -> (&'static str, String) {
    let bin = js_dir().join("node_modules").join(".bin");
    let path = std::env::var("PATH").unwrap_or_default();
    ("PATH", format!("{}:{path}", bin.display()))
}

/// Where test artifacts (screenshots) go: `interop-tests/artifacts/` (git-ignored).
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// What a child process did.
pub struct Ran {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output and standard error, interleaved as two blocks.
    pub output: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Ran {
    /// Panics with the whole output unless the process exited with 0.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} failed ({}):\n{}",
            self.status,
            self.output
        );
    }
}

/// Runs `program args` in `dir` with `envs`, killing it after `limit` (and then failing the
/// test with what it printed so far).
pub async fn run(
    program: &str,
    args: &[&str],
    dir: &Path,
    envs: &[(&str, String)],
    limit: Duration,
) -> Ran {
    let started = Instant::now();
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .envs(envs.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{program}` ({e}): {INSTALL_HINT}"));
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = tokio::time::timeout(limit, child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let output = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&stdout.await.unwrap_or_default()),
        String::from_utf8_lossy(&stderr.await.unwrap_or_default())
    );
    let status = status
        .unwrap_or_else(|_| {
            panic!(
                "`{program} {}` ran longer than {limit:?}:\n{output}",
                args.join(" ")
            )
        })
        .unwrap_or_else(|e| panic!("waiting for `{program}`: {e}"));
    Ran {
        status,
        output,
        elapsed: started.elapsed(),
    }
}

/// Reads a child's pipe to its end in the background.
fn collect<R>(pipe: Option<R>) -> JoinHandle<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out).await;
        }
        out
    })
}

/// Totals from the closing lines of node's TAP reporter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TapSummary {
    /// `# pass N`.
    pub pass: u64,
    /// `# fail N`.
    pub fail: u64,
    /// `# skipped N`.
    pub skipped: u64,
    /// `# todo N`.
    pub todo: u64,
    /// Names of the passing tests (`ok N - name`).
    pub passed: Vec<String>,
}

/// Reads the TAP output of `node --test --test-reporter=tap`.
pub fn tap_summary(output: &str) -> TapSummary {
    let mut summary = TapSummary::default();
    for line in output.lines() {
        let trimmed = line.trim_start();
        let count = |prefix: &str| {
            trimmed
                .strip_prefix(prefix)
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        if let Some(n) = count("# pass ") {
            summary.pass = n;
        } else if let Some(n) = count("# fail ") {
            summary.fail = n;
        } else if let Some(n) = count("# skipped ") {
            summary.skipped = n;
        } else if let Some(n) = count("# todo ") {
            summary.todo = n;
        } else if line.starts_with("ok ") {
            // Top-level tests only (subtests are indented).
            if let Some((_, name)) = line.split_once(" - ") {
                summary.passed.push(name.to_owned());
            }
        }
    }
    summary
}

/// Runs `node --test` on `files` (relative to interop-tests/js) with `envs` and asserts that
/// exactly `expected` tests ran and all passed; returns the names of the passing tests.
pub async fn node_test(
    files: &[&str],
    envs: &[(&str, String)],
    expected: u64,
    limit: Duration,
) -> Vec<String> {
    require_node_modules();
    let mut args = vec!["--test", "--test-reporter=tap", "--test-concurrency=1"];
    args.extend_from_slice(files);
    let ran = run("node", &args, &js_dir(), envs, limit).await;
    ran.assert_success(&format!("node --test {}", files.join(" ")));
    let summary = tap_summary(&ran.output);
    assert_eq!(
        (summary.pass, summary.fail, summary.skipped, summary.todo),
        (expected, 0, 0, 0),
        "expected {expected} passing tests and nothing else:\n{}",
        ran.output
    );
    eprintln!(
        "node --test {}: {} passed in {:.1?}",
        files.join(" "),
        summary.pass,
        ran.elapsed
    );
    summary.passed
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "pnp-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside it and returns the file's path.
    pub fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET /` answers the demo upstream's counters as JSON (`{"started":…,"cancelled":…,
/// "active":…}`), with CORS open so a page could read them too. One request per connection.
pub struct StatsEndpoint {
    url: String,
    task: JoinHandle<()>,
}

impl StatsEndpoint {
    /// Serves `stats` on a loopback port.
    pub async fn start(stats: DemoStats) -> StatsEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding the stats endpoint: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("stats endpoint address: {e}"));
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let stats = stats.clone();
                tokio::spawn(async move {
                    // Read the request head; its content does not matter.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = format!(
                        r#"{{"started":{},"cancelled":{},"active":{}}}"#,
                        stats.calls_started(),
                        stats.calls_cancelled(),
                        stats.active_streams()
                    );
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         access-control-allow-origin: *\r\ncache-control: no-store\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        StatsEndpoint {
            url: format!("http://{addr}/"),
            task,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for StatsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Paths of the files under `dir`, relative to it, sorted (empty if `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
