//! `pnp certs dev DIR`: a development CA and the certificates signed by it, for the HTTP/3
//! listener (TLS is mandatory on QUIC), for `--upstream h3://` peers and for the control API's
//! mTLS (`pnp control`, `pnp ctl`).
//!
//! Development only: the CA key is written beside the certificates, unprotected but for its
//! file mode, and the certificates never expire in practice (rcgen's default validity).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The files `pnp certs dev` writes, in the order it writes them.
pub(crate) const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// The name (DNS subject alternative name) of the development client certificate.
pub(crate) const CLIENT_NAME: &str = "pnp-dev-client";

/// What was generated, in PEM.
pub(crate) struct DevCerts {
    /// The CA's certificate (the trust root to give clients and `--upstream-ca`).
    pub(crate) ca: String,
    /// The CA's private key.
    pub(crate) ca_key: String,
    /// The server certificate: `localhost`, `127.0.0.1` and `::1`, server-auth.
    pub(crate) server: String,
    /// Its private key.
    pub(crate) server_key: String,
    /// The client certificate (client-auth, [`CLIENT_NAME`]), for mTLS (`pnp ctl`).
    pub(crate) client: String,
    /// Its private key.
    pub(crate) client_key: String,
}

/// Make a CA, and a server and a client certificate signed by it.
pub(crate) fn generate() -> anyhow::Result<DevCerts> {
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pnp development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;

    let server_key = KeyPair::generate().context("generating the server key")?;
    let mut server_params = CertificateParams::new(Vec::<String>::new())?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params
        .signed_by(&server_key, &ca, &ca_key)
        .context("signing the server certificate")?;

    let client_key = KeyPair::generate().context("generating the client key")?;
    // The name is what `pnp control --allow-client` matches.
    let mut client_params = CertificateParams::new(vec![CLIENT_NAME.to_owned()])?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "pnp development client");
    client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &ca, &ca_key)
        .context("signing the client certificate")?;

    Ok(DevCerts {
        ca: ca.pem(),
        ca_key: ca_key.serialize_pem(),
        server: server.pem(),
        server_key: server_key.serialize_pem(),
        client: client.pem(),
        client_key: client_key.serialize_pem(),
    })
}

/// Write fresh development certificates into `dir` (created if missing). Refuses to overwrite:
/// replacing a CA that clients already trust is never what a second run should do silently.
/// Keys are written with mode 0600.
pub(crate) fn write_dev(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let existing: Vec<_> = FILES
        .iter()
        .map(|name| dir.join(name))
        .filter(|path| path.exists())
        .collect();
    ensure!(
        existing.is_empty(),
        "{} already exists; remove the old certificates first",
        existing
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let certs = generate()?;
    let contents = [
        &certs.ca,
        &certs.ca_key,
        &certs.server,
        &certs.server_key,
        &certs.client,
        &certs.client_key,
    ];
    let mut written = Vec::new();
    for (name, pem) in FILES.iter().zip(contents) {
        let path = dir.join(name);
        let secret = name.ends_with("-key.pem");
        write_file(&path, pem.as_bytes(), secret)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("valid PEM")
    }

    fn verifier(ca: &str) -> Arc<rustls::client::WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(ca)).expect("the CA is a valid root");
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier")
    }

    #[test]
    fn the_server_certificate_verifies_against_the_ca_for_localhost_and_loopback() {
        let certs = generate().expect("certificates");
        let verifier = verifier(&certs.ca);
        let server = der(&certs.server);
        for name in ["localhost", "127.0.0.1", "::1"] {
            let name = ServerName::try_from(name).expect("server name");
            verifier
                .verify_server_cert(&server, &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let other = ServerName::try_from("example.com").expect("server name");
        assert!(
            verifier
                .verify_server_cert(&server, &[], &other, &[], UnixTime::now())
                .is_err(),
            "the server certificate must not be valid for other names"
        );
        // Another CA does not vouch for it.
        let stranger = generate().expect("certificates");
        let name = ServerName::try_from("localhost").expect("server name");
        assert!(super::tests::verifier(&stranger.ca)
            .verify_server_cert(&server, &[], &name, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn the_client_certificate_is_not_a_server_certificate() {
        let certs = generate().expect("certificates");
        let name = ServerName::try_from("localhost").expect("server name");
        assert!(verifier(&certs.ca)
            .verify_server_cert(&der(&certs.client), &[], &name, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn writes_six_files_keys_private_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("pnp-certs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = write_dev(&dir).expect("written");
        assert_eq!(written.len(), 6);
        #[cfg(unix)]
        for path in &written {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777;
            let key = path.to_string_lossy().ends_with("-key.pem");
            if key {
                assert_eq!(mode, 0o600, "{}", path.display());
            } else {
                assert_ne!(mode & 0o400, 0, "{}", path.display());
            }
        }
        let ca = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
        let err = write_dev(&dir).expect_err("a second run must refuse");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem"),
            ca,
            "the CA was replaced"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
