//! The TOML shape, exactly as written by users, and its conversion into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::{
    parse_size, AllowedOrigins, Config, ConfigError, Cors, Limits, Shutdown, TlsFiles, Upstream,
    UpstreamTarget, DEFAULT_CONNECT_TIMEOUT, DEFAULT_GRACE_PERIOD,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    cors: RawCors,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    shutdown: RawShutdown,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Option<String>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    addr: Option<String>,
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    /// `demo`, `http://host:port` or `https://host:port`.
    url: Option<String>,
    ca: Option<PathBuf>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allowed_origins: Option<Vec<String>>,
    expose_headers: Option<Vec<String>>,
    max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace_period: Option<String>,
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|e| invalid(key, format!("`{text}` is not an IP:port address ({e})")))
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| invalid(key, format!("`{text}`: {e}")))
}

pub(crate) fn parse_upstream(key: &str, text: &str) -> Result<UpstreamTarget, ConfigError> {
    if text == "demo" {
        return Ok(UpstreamTarget::Demo);
    }
    let url = url::Url::parse(text).map_err(|e| invalid(key, format!("`{text}`: {e}")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(invalid(
                key,
                format!("scheme `{other}` is not supported (use http:// for h2c, https:// for TLS, or `demo`)"),
            ))
        }
    }
    if url.host().is_none() {
        return Err(invalid(key, format!("`{text}` has no host")));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(invalid(
            key,
            format!("`{text}` has a path; gRPC upstreams are addressed by host and port only"),
        ));
    }
    Ok(UpstreamTarget::Url(url))
}

impl RawConfig {
    pub(crate) fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = Config::demo();

        if let Some(addr) = &self.listener.addr {
            config.listener.addr = parse_addr("listener.addr", addr)?;
        }
        config.listener.tls = self.listener.tls.map(|tls| TlsFiles {
            cert: tls.cert,
            key: tls.key,
        });

        if self.admin.enabled == Some(false) {
            config.admin = None;
        } else if let Some(addr) = &self.admin.addr {
            config.admin = Some(parse_addr("admin.addr", addr)?);
        }

        config.upstream = Upstream {
            target: match &self.upstream.url {
                Some(url) => parse_upstream("upstream.url", url)?,
                None => UpstreamTarget::Demo,
            },
            ca: self.upstream.ca,
            connect_timeout: match &self.upstream.connect_timeout {
                Some(text) => parse_duration("upstream.connect_timeout", text)?,
                None => DEFAULT_CONNECT_TIMEOUT,
            },
        };

        config.cors = Cors {
            allowed_origins: match self.cors.allowed_origins {
                None => AllowedOrigins::Any,
                Some(list) if list.iter().any(|o| o == "*") => AllowedOrigins::Any,
                Some(list) => {
                    for origin in &list {
                        let valid = url::Url::parse(origin)
                            .map(|u| {
                                u.host().is_some() && u.path() == "/" && !origin.ends_with('/')
                            })
                            .unwrap_or(false);
                        if !valid {
                            return Err(invalid(
                                "cors.allowed_origins",
                                format!("`{origin}` is not an origin like https://app.example.com"),
                            ));
                        }
                    }
                    AllowedOrigins::List(list)
                }
            },
            expose_headers: {
                let names = self.cors.expose_headers.unwrap_or_default();
                if let Some(bad) = names.iter().find(|n| !is_token(n)) {
                    return Err(invalid(
                        "cors.expose_headers",
                        format!("`{bad}` is not a header name"),
                    ));
                }
                names
            },
            max_age: match &self.cors.max_age {
                Some(text) => parse_duration("cors.max_age", text)?,
                None => config.cors.max_age,
            },
        };

        config.limits = Limits {
            max_message_size: match &self.limits.max_message_size {
                Some(text) => {
                    parse_size(text).map_err(|reason| invalid("limits.max_message_size", reason))?
                }
                None => config.limits.max_message_size,
            },
        };

        config.shutdown = Shutdown {
            grace_period: match &self.shutdown.grace_period {
                Some(text) => parse_duration("shutdown.grace_period", text)?,
                None => DEFAULT_GRACE_PERIOD,
            },
        };
        Ok(config)
    }
}

/// RFC 9110 token characters, which is what a header name may hold.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_the_demo() {
        assert_eq!(
            Config::from_toml("").expect("empty config parses"),
            Config::demo()
        );
    }

    #[test]
    fn full_document() {
        let config = Config::from_toml(
            r#"
            [listener]
            addr = "0.0.0.0:8443"
            tls = { cert = "c.pem", key = "k.pem" }
            [admin]
            addr = "127.0.0.1:9902"
            [upstream]
            url = "https://model.internal:50051"
            ca = "ca.pem"
            connect_timeout = "2s"
            [cors]
            allowed_origins = ["https://app.example.com"]
            expose_headers = ["x-pnp-transport"]
            max_age = "1h"
            [limits]
            max_message_size = "16MiB"
            [shutdown]
            grace_period = "45s"
            "#,
        )
        .expect("config parses");
        assert_eq!(config.listener.addr, "0.0.0.0:8443".parse().expect("addr"));
        assert!(config.listener.tls.is_some());
        assert_eq!(config.admin, Some("127.0.0.1:9902".parse().expect("addr")));
        assert!(
            matches!(config.upstream.target, UpstreamTarget::Url(ref u) if u.scheme() == "https")
        );
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(
            config.cors.allowed_origins,
            AllowedOrigins::List(vec!["https://app.example.com".into()])
        );
        assert_eq!(config.limits.max_message_size, 16 << 20);
        assert_eq!(config.shutdown.grace_period, Duration::from_secs(45));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[listener]\nadress = \"x\"\n").expect_err("typo must fail");
        assert!(err.to_string().contains("adress"), "{err}");
        let err = Config::from_toml("[listner]\n").expect_err("typo must fail");
        assert!(err.to_string().contains("listner"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("[listener]\naddr = \"localhost\"", "listener.addr"),
            ("[upstream]\nurl = \"ftp://x\"", "upstream.url"),
            ("[upstream]\nurl = \"http://x:1/path\"", "upstream.url"),
            (
                "[shutdown]\ngrace_period = \"soon\"",
                "shutdown.grace_period",
            ),
            (
                "[limits]\nmax_message_size = \"big\"",
                "limits.max_message_size",
            ),
            (
                "[cors]\nallowed_origins = [\"app.example.com\"]",
                "cors.allowed_origins",
            ),
            (
                "[cors]\nexpose_headers = [\"bad header\"]",
                "cors.expose_headers",
            ),
        ] {
            let err = Config::from_toml(doc).expect_err(doc);
            assert!(err.to_string().contains(key), "{doc}: {err}");
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let config = Config::from_toml(include_str!("../../../deploy/pnp.example.toml"))
            .expect("deploy/pnp.example.toml parses");
        assert_eq!(config.admin, Some("127.0.0.1:9901".parse().expect("addr")));
        assert_eq!(config.cors.expose_headers, ["x-request-id"]);
        assert!(matches!(config.upstream.target, UpstreamTarget::Url(_)));
    }

    #[test]
    fn admin_can_be_disabled_and_star_means_any() {
        let config =
            Config::from_toml("[admin]\nenabled = false\n[cors]\nallowed_origins = [\"*\"]")
                .expect("parses");
        assert_eq!(config.admin, None);
        assert_eq!(config.cors.allowed_origins, AllowedOrigins::Any);
    }
}
