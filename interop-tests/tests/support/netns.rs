//! A network namespace for a test: a veth pair between it and the test's own namespace, an
//! address on each side, nftables rules inside it (to drop or lose packets), and programs run
//! inside it (`ip netns exec`). Needs root, iproute2 and nftables (`scripts/install-test-deps`).
//! Where namespaces cannot be made, [`Netns::or_skip`] says why and the test skips — unless
//! `PNP_REQUIRE_NETNS=1` (set by `.ci/run`), which makes that a failure.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Netns {
    name: String,
    host_if: String,
    /// The address on the test's side of the veth pair.
    pub host_ip: Ipv4Addr,
    /// The address inside the namespace.
    pub ns_ip: Ipv4Addr,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Netns {
    /// A fresh namespace joined to this one by a veth pair (a /30 of its own).
    pub fn create() -> Result<Netns, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let (a, b) = (
            u8::try_from(pid % 250).unwrap_or(0),
            u8::try_from(n % 64).unwrap_or(0) * 4,
        );
        let ns = Netns {
            name: format!("pnp-test-{tag}"),
            host_if: format!("pnph{tag}"),
            host_ip: Ipv4Addr::new(10, 213 + (pid % 3) as u8, a, b + 1),
            ns_ip: Ipv4Addr::new(10, 213 + (pid % 3) as u8, a, b + 2),
        };
        let ns_if = format!("pnpn{tag}");
        run("ip", &["netns", "add", &ns.name])?;
        // From here on, Drop removes what was made.
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns_if,
            ],
        )?;
        run("ip", &["link", "set", &ns_if, "netns", &ns.name])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", ns.host_ip),
                "dev",
                &ns.host_if,
            ],
        )?;
        run("ip", &["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.name.as_str(), "ip"];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// [`create`](Self::create), or `None` after saying why the test skips. With
    /// `PNP_REQUIRE_NETNS=1` a namespace that cannot be made fails the test instead.
    pub fn or_skip(test: &str) -> Option<Netns> {
        match Netns::create() {
            Ok(ns) => Some(ns),
            Err(why) if std::env::var_os("PNP_REQUIRE_NETNS").is_some_and(|v| v == "1") => {
                panic!("{test}: PNP_REQUIRE_NETNS=1 but no network namespace: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED {test}: cannot create a network namespace here ({why}); run as root with iproute2 and nftables");
                None
            }
        }
    }

    /// `program args…` inside the namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        command
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("nft: {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ruleset.as_bytes())
            .expect("writing the ruleset");
        let output = child.wait_with_output().expect("nft");
        assert!(
            output.status.success(),
            "nft -f: {}\n{ruleset}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `nft list ruleset` inside the namespace (with its counters).
    pub fn nft_list(&self) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "list", "ruleset"])
            .output()
            .expect("nft list");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the veth pair, and with it the pair.
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// The packets an nftables rule's `counter` saw, summed over `nft list ruleset` lines that
/// contain `marker`.
pub fn dropped(ruleset: &str, marker: &str) -> u64 {
    ruleset
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            let rest = l.split("packets ").nth(1)?;
            rest.split(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}
