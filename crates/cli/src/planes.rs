//! `pnp serve` as two processes: the data plane (this process) and the control plane (`pnp
//! control`, a child process of the same binary), which meet only through the rings in the link
//! directory. The child is restarted when it dies; the data plane serves on with its last good
//! config meanwhile, and a restarted control plane re-attaches to the same rings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Where `pnp serve` puts the rings when `--link-dir` is not given: a fresh directory in
/// `/dev/shm` (memory) when it exists, else the temp dir.
pub(crate) fn default_link_dir() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_owned()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("pnp-link-{}", std::process::id()))
}

/// What the control-plane child is started with.
#[derive(Clone, Debug)]
pub(crate) struct ControlChild {
    pub(crate) link_dir: PathBuf,
    pub(crate) listen: SocketAddr,
    /// A directory in the layout of `pnp certs dev`: server.pem, server-key.pem, ca.pem.
    pub(crate) certs: PathBuf,
    /// Where the freeze loop writes its snapshots.
    pub(crate) snapshots: PathBuf,
    /// Origins allowed to call the API from a browser (`--cors-origin`).
    pub(crate) cors_origins: Vec<String>,
}

impl ControlChild {
    fn command(&self) -> std::io::Result<Command> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        command
            .arg("control")
            .arg("--link-dir")
            .arg(&self.link_dir)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--tls-cert")
            .arg(self.certs.join("server.pem"))
            .arg("--tls-key")
            .arg(self.certs.join("server-key.pem"))
            .arg("--client-ca")
            .arg(self.certs.join("ca.pem"))
            .arg("--snapshot-dir")
            .arg(&self.snapshots)
            // If this process is killed outright (no drop runs), the child sees its parent
            // change and stops.
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .kill_on_drop(true);
        for origin in &self.cors_origins {
            command.arg("--cors-origin").arg(origin);
        }
        Ok(command)
    }

    /// Runs the control plane as a child process until `stop`, restarting it (after a pause
    /// that grows to 10 s) whenever it exits.
    pub(crate) fn supervise(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            loop {
                let child: std::io::Result<Child> = self.command().and_then(|mut c| c.spawn());
                match child {
                    Ok(mut child) => {
                        tracing::info!(
                            pid = child.id(),
                            listen = %self.listen,
                            link = %self.link_dir.display(),
                            "control plane started"
                        );
                        tokio::select! {
                            () = stop.cancelled() => {
                                let _ = child.start_kill();
                                let _ = child.wait().await;
                                return;
                            }
                            status = child.wait() => {
                                tracing::warn!(?status, "control plane exited; restarting it (the data plane serves on)");
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the control plane"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        })
    }
}

/// Re-reads `path` on every SIGHUP and applies it to `proxy` (profiles, routes, limits,
/// transport choices); a config that does not validate is refused and logged, the one in force
/// stays.
#[cfg(unix)]
pub(crate) async fn reload_on_sighup(proxy: &pnp_proxy::Proxy, path: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        std::future::pending::<()>().await;
        return;
    };
    while hangup.recv().await.is_some() {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "SIGHUP: cannot read the config; keeping the one in force");
                continue;
            }
        };
        match proxy.apply_config(&text, false) {
            Ok(change) => tracing::info!(
                path = %path.display(),
                version = change.version,
                applied = change.applied,
                diff = %change.diff.join("; "),
                "SIGHUP: config reloaded"
            ),
            Err(reason) => tracing::error!(
                path = %path.display(),
                %reason,
                "SIGHUP: config refused; keeping the one in force"
            ),
        }
    }
}

/// Without SIGHUP there is nothing to wait for.
#[cfg(not(unix))]
pub(crate) async fn reload_on_sighup(_proxy: &pnp_proxy::Proxy, _path: &Path) {
    std::future::pending::<()>().await;
}
