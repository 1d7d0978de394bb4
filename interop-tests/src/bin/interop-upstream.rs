//! The demo upstreams (`grpc.testing.TestService` and `demo.llm.v1.Generator`) in a process of
//! their own, so failure tests can kill a real upstream with SIGKILL.
//!
//! Usage: `interop-upstream [ADDR]` (default `127.0.0.1:0`). Prints `listening on ADDR` on
//! stdout once it accepts connections, then serves until killed.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use pnp_demo::DemoUpstream;

#[tokio::main]
async fn main() -> ExitCode {
    let addr: SocketAddr = match std::env::args().nth(1) {
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(text) => match text.parse() {
            Ok(addr) => addr,
            Err(e) => {
                eprintln!("interop-upstream: bad address {text:?}: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let upstream = match DemoUpstream::start(addr).await {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("interop-upstream: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {}", upstream.local_addr())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    // Runs until killed; the test that started it sends SIGKILL.
    std::future::pending::<()>().await;
    drop(upstream);
    ExitCode::SUCCESS
}
