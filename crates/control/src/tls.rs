//! mTLS for the control API: the server requires a client certificate signed by the configured
//! CA (and, when an allow-list is set, valid for one of its names); clients verify the server's
//! certificate against the same kind of CA. rustls with the ring provider, like the rest of pnp.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file or item.
        what: String,
        /// Why.
        reason: String,
    },
    /// A client name of the allow-list is no DNS name or IP address.
    #[error("client name {0:?} is no DNS name or IP address")]
    ClientName(String),
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// PEM text of a certificate chain and its private key.
#[derive(Clone)]
pub struct Identity {
    /// The certificate chain, leaf first.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads a certificate chain and its key from PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        Ok(Identity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certs(&self.cert_pem, "certificate chain")
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .map_err(|e| pem_error("private key", e))?
            .ok_or_else(|| TlsError::Pem {
                what: "private key".into(),
                reason: "no PEM private key found".into(),
            })
    }
}

/// The control API server's TLS settings.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate and key.
    pub identity: Identity,
    /// PEM of the CA(s) whose client certificates are accepted.
    pub client_ca_pem: String,
    /// Client names (DNS names or IP addresses in the certificate's subject alternative names)
    /// allowed in; empty: any certificate the CA signed.
    pub allowed_clients: Vec<String>,
}

impl ServerTls {
    /// Reads the server's certificate and key and the client CA from PEM files.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        allowed_clients: Vec<String>,
    ) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            identity: Identity::from_files(cert, key)?,
            client_ca_pem: read(client_ca)?,
            allowed_clients,
        })
    }

    /// The rustls server config: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1` (gRPC-Web from
    /// browsers), client certificates required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = roots(&self.client_ca_pem, "client CA")?;
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Pem {
                what: "client CA".into(),
                reason: e.to_string(),
            })?;
        let allowed = self
            .allowed_clients
            .iter()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|_| TlsError::ClientName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let verifier = Arc::new(AllowListVerifier { inner, allowed });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.identity.chain()?, self.identity.key()?)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A control API client's TLS settings.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: String,
    /// The client's certificate and key (the server refuses clients without one).
    pub identity: Option<Identity>,
    /// The name the server's certificate must be valid for.
    pub server_name: String,
}

impl ClientTls {
    /// The rustls client config, ALPN `h2`.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        self.client_config_with_alpn(vec![b"h2".to_vec()])
    }

    /// The rustls client config with the given ALPN protocols (`http/1.1` for a gRPC-Web
    /// client).
    pub fn client_config_with_alpn(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.ca_pem, "server CA")?);
        let mut config = match &self.identity {
            Some(identity) => builder.with_client_auth_cert(identity.chain()?, identity.key()?)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn;
        Ok(config)
    }

    /// The server name to verify, as rustls wants it.
    pub fn server_name(&self) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(self.server_name.clone())
            .map_err(|_| TlsError::ClientName(self.server_name.clone()))
    }
}

/// The first of `allowed` that `cert` is valid for (`None` when none is, or it does not parse).
pub(crate) fn allowed_name(cert: &CertificateDer<'_>, allowed: &[String]) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    allowed.iter().find_map(|name| {
        let server_name = ServerName::try_from(name.as_str()).ok()?;
        cert.verify_is_valid_for_subject_name(&server_name)
            .ok()
            .map(|()| name.clone())
    })
}

/// webpki's client verification (chain to the CA, validity dates, client-auth usage) and then
/// the allow-list of names.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self
            .allowed
            .iter()
            .any(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(what: &str, e: std::io::Error) -> TlsError {
    TlsError::Pem {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.into(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

fn roots(pem: &str, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(pem, what)? {
        roots.add(cert)?;
    }
    Ok(roots)
}
