//! `pnp control`: the control plane alone, attached to a data plane through the link
//! directory, serving the mTLS control API until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// `pnp control` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct ControlArgs {
    /// The link directory shared with the data plane (`pnp data --link-dir`); created if
    /// missing. In Kubernetes an emptyDir with medium Memory, locally e.g. /dev/shm/pnp.
    #[arg(long)]
    link_dir: PathBuf,
    /// Where the control API (gRPC and gRPC-Web over mTLS) listens.
    #[arg(long, default_value = "127.0.0.1:9444")]
    listen: SocketAddr,
    /// PEM certificate chain of the control API (e.g. dev-certs/server.pem).
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: PathBuf,
    /// PEM CA whose client certificates are let in (e.g. dev-certs/ca.pem).
    #[arg(long)]
    client_ca: PathBuf,
    /// Let in only client certificates valid for this name (a DNS name or IP address in the
    /// certificate's subject alternative names); repeat for more. Default: any the CA signed.
    #[arg(long = "allow-client", value_name = "NAME")]
    allow_clients: Vec<String>,
    /// Directory for freeze snapshots (JSON: job, reason, rule values, recent calls).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// Freeze a job with more than this many non-OK statuses in --freeze-error-window...
    #[arg(long, default_value_t = 100)]
    freeze_errors: u64,
    /// ...while it made more than this many retries in --freeze-retry-window.
    #[arg(long, default_value_t = 50)]
    freeze_retries: u64,
    /// The window of --freeze-errors.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    freeze_error_window: Duration,
    /// The window of --freeze-retries.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    freeze_retry_window: Duration,
    /// Turn the alert → freeze loop off.
    #[arg(long)]
    no_freeze: bool,
    /// How long a command waits for the data plane's acknowledgement.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// An origin whose pages may call the API from a browser, e.g.
    /// https://console.example.com (CORS with credentials: the browser presents the client
    /// certificate); repeat for more. Default: none, so only a page from the API's own origin
    /// can read replies.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Stop when the process with this id is no longer this one's parent (`pnp serve` passes
    /// its own: a control plane whose data plane was killed must not live on, holding the
    /// API's port against the restarted one).
    #[arg(long, hide = true)]
    parent_pid: Option<u32>,
}

pub(crate) async fn run(args: ControlArgs) -> anyhow::Result<()> {
    let stop = crate::ShutdownSignal::listen();
    std::fs::create_dir_all(&args.link_dir)
        .with_context(|| format!("creating {}", args.link_dir.display()))?;
    let tls = pnp_control::ServerTls::from_files(
        &args.tls_cert,
        &args.tls_key,
        &args.client_ca,
        args.allow_clients,
    )?;
    let mut options = pnp_control::ControlOptions::new(&args.link_dir, args.listen, tls);
    options.freeze = (!args.no_freeze).then_some(pnp_control::FreezeRule {
        max_errors: args.freeze_errors,
        error_window: args.freeze_error_window,
        max_retries: args.freeze_retries,
        retry_window: args.freeze_retry_window,
    });
    options.snapshot_dir = args.snapshot_dir;
    options.ack_timeout = args.ack_timeout;
    options.cors_origins = args.cors_origins;
    let freeze = options
        .freeze
        .map_or_else(|| "off".to_owned(), |rule| rule.describe());
    let plane = pnp_control::ControlPlane::start(options).await?;
    // Tests and scripts read this line to learn the port.
    eprintln!(
        "pnp control listening on https://{} (link {}; freeze rule: {freeze})",
        plane.local_addr(),
        args.link_dir.display()
    );
    tokio::select! {
        () = stop.received() => tracing::info!("signal received: stopping the control plane"),
        () = parent_gone(args.parent_pid) => {
            tracing::warn!("the pnp serve that started this control plane is gone: stopping");
        }
    }
    plane.shutdown().await;
    Ok(())
}

/// How often a control plane started by `pnp serve` looks whether its parent still lives.
const PARENT_CHECK: Duration = Duration::from_millis(250);

/// Resolves when this process's parent is no longer `pid` (it died and the process was
/// re-parented); never without a pid.
async fn parent_gone(pid: Option<u32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    #[cfg(unix)]
    loop {
        if std::os::unix::process::parent_id() != pid {
            return;
        }
        tokio::time::sleep(PARENT_CHECK).await;
    }
    #[cfg(not(unix))]
    {
        let _ = (pid, PARENT_CHECK);
        std::future::pending().await
    }
}
