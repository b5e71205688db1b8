//! TLS to etcd: the trust anchors and the client certificate an etcd
//! handler's `certificate_*` keys name (the original's keys), read and
//! checked once when the service starts, so that a bad path or PEM stops
//! the start with the key and the path named, never a request later.
//!
//! rustls with ring: the TLS stack lapin and redis already bring. Messages
//! name files and what is wrong with them, never their content.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::error::ConfigError;

/// The CA file that verifies the server, a handler key.
pub const CA_KEY: &str = "certificate_ca_path";
/// The client certificate (chain) for mutual TLS, a handler key.
pub const CERT_KEY: &str = "certificate_path";
/// The client certificate's private key, a handler key.
pub const KEY_KEY: &str = "certificate_key_path";

/// The files an etcd handler's configuration names.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    /// `certificate_ca_path`: the CA certificates (PEM) trusted for the
    /// server; without it, the system's.
    pub ca: Option<&'a str>,
    /// `certificate_path` and `certificate_key_path`: the client
    /// certificate chain and its key (PEM), sent when etcd asks.
    pub client: Option<(&'a str, &'a str)>,
}

impl TlsFiles<'_> {
    /// Whether any TLS file is configured.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }
}

/// The crypto provider of every etcd connection, set explicitly: the
/// plugin is a library of its own and must not depend on a process-wide
/// default someone else may or may not have installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS settings of an etcd handler's connections for `files`
/// (`handler` names the handler in errors), built and checked here: a
/// key rustls cannot sign with, or one that does not belong to its
/// certificate, is an error now, not on the first connection.
pub fn tls_config(handler: &str, files: TlsFiles<'_>) -> Result<Arc<ClientConfig>, ConfigError> {
    let bad = |key: &str, path: &str, why: String| {
        ConfigError(format!(
            "etcd handler \"{handler}\": \"{key}\" {path}: {why}"
        ))
    };

    let store = match files.ca {
        Some(path) => {
            let certs = certificates(&read(path).map_err(|e| bad(CA_KEY, path, e))?)
                .map_err(|e| bad(CA_KEY, path, e))?;
            let mut store = RootCertStore::empty();
            for (i, cert) in certs.into_iter().enumerate() {
                store.add(cert).map_err(|e| {
                    bad(
                        CA_KEY,
                        path,
                        format!("certificate {} is not a usable CA certificate: {e}", i + 1),
                    )
                })?;
            }
            store
        }
        None => system_roots().map_err(|why| {
            ConfigError(format!(
                "etcd handler \"{handler}\": {why}; name the CA that signed etcd's \
                 certificate in \"{CA_KEY}\""
            ))
        })?,
    };

    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("etcd handler \"{handler}\": TLS: {e}")))?
        .with_root_certificates(store);
    let config = match files.client {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let chain = certificates(&read(cert_path).map_err(|e| bad(CERT_KEY, cert_path, e))?)
                .map_err(|e| bad(CERT_KEY, cert_path, e))?;
            let key_pem = read(key_path).map_err(|e| bad(KEY_KEY, key_path, e))?;
            let key = private_key(&key_pem).map_err(|e| bad(KEY_KEY, key_path, e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                ConfigError(format!(
                    "etcd handler \"{handler}\": \"{CERT_KEY}\" {cert_path} with \
                     \"{KEY_KEY}\" {key_path}: not a usable client certificate and key: {e}"
                ))
            })?
        }
    };
    Ok(Arc::new(config))
}

/// What a TLS handler shows etcd of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// No client certificate.
    Nothing,
    /// The client certificate of `certificate_path`.
    ClientCert,
}

/// The errors `e` stands on, itself first.
fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// `e` and its causes in one line, each said once (`client error
/// (Connect): tcp connect error: Connection refused (os error 111)`).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for cause in chain(e) {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Why a call to etcd failed, said in terms of the handler's keys when
/// TLS may be why (`tls`: how the handler speaks TLS, if it does).
pub fn why_failed(e: &(dyn std::error::Error + 'static), tls: Option<Shown>) -> String {
    use rustls::{AlertDescription as Alert, CertificateError, Error as Tls};
    use std::io::ErrorKind;
    let said = describe(e);
    let Some(shown) = tls else {
        return said;
    };
    let refused = match shown {
        Shown::Nothing => {
            format!("etcd asks for a client certificate: set \"{CERT_KEY}\" and \"{KEY_KEY}\"")
        }
        Shown::ClientCert => format!("etcd refused the client certificate of \"{CERT_KEY}\""),
    };
    let rustls_error = chain(e).find_map(|c| {
        c.downcast_ref::<Tls>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<Tls>())
        })
    });
    let Some(tls) = rustls_error else {
        // etcd refuses a client in TLS 1.3 after the client's side of the
        // handshake is done: the alert saying why is lost when the
        // request's write meets the closed connection first.
        let closed = chain(e).any(|c| {
            c.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_incomplete_message)
                || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        ErrorKind::BrokenPipe
                            | ErrorKind::ConnectionReset
                            | ErrorKind::UnexpectedEof
                    )
                })
        });
        return if closed {
            format!("{said}: etcd closed the TLS connection; if that is because {refused}")
        } else {
            said
        };
    };
    let hint = match tls {
        Tls::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "etcd's certificate is not from a CA of \"{CA_KEY}\" (or of the system's store \
             without it)"
        ),
        Tls::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "etcd's certificate is not for the host of \"server_url\"".into(),
        Tls::AlertReceived(
            Alert::BadCertificate
            | Alert::CertificateRequired
            | Alert::UnknownCA
            | Alert::CertificateUnknown,
        ) => refused,
        _ => return format!("TLS: {tls}"),
    };
    format!("TLS: {tls}: {hint}")
}

/// What is wrong with a PEM file, in words of our own: the parser's
/// messages quote the offending line, which may be key material.
fn pem_why(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    let why = match e {
        Error::MissingSectionEnd { .. } => "a section without its END line",
        Error::IllegalSectionStart { .. } => "a malformed BEGIN line",
        Error::Base64Decode(_) => "a section that is not base64",
        Error::SectionTooLarge => "a section over 256 MB",
        _ => "unreadable",
    };
    format!("not valid PEM ({why})")
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("cannot read it: {e}"))
}

/// Every section of a PEM file, in order.
fn sections(pem: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_why(&e))
}

/// Every certificate of a PEM file, in order; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    // A key next to the certificates is allowed, and skipped.
    let certs: Vec<CertificateDer<'static>> = sections(pem)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// The one private key of a PEM file.
fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    let keys = sections(pem)?
        .into_iter()
        .filter(|(kind, _)| {
            matches!(
                kind,
                SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
            )
        })
        .count();
    match keys {
        1 => PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_why(&e)),
        0 => Err("holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)".into()),
        n => Err(format!("holds {n} private keys, not one")),
    }
}

/// The system's CA certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` when
/// set, else the distribution's bundle).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!("no CA certificates in the system's store{why}"));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A CA, a server and a client certificate from scripts/tls-ca.sh.
    fn ca_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tls-ca.sh");
        let status = Command::new(script)
            .arg(dir.path().join("tls"))
            .status()
            .expect("run scripts/tls-ca.sh");
        assert!(status.success());
        dir
    }

    fn path(dir: &tempfile::TempDir, name: &str) -> String {
        dir.path().join("tls").join(name).display().to_string()
    }

    fn err(files: TlsFiles<'_>) -> String {
        tls_config("h", files).expect_err("refused").to_string()
    }

    #[test]
    fn loads_a_ca_and_a_client_certificate() {
        let dir = ca_dir();
        let (ca, cert, key) = (
            path(&dir, "ca.pem"),
            path(&dir, "client.pem"),
            path(&dir, "client.key"),
        );
        let config = tls_config(
            "h",
            TlsFiles {
                ca: Some(&ca),
                client: Some((&cert, &key)),
            },
        )
        .expect("loads");
        assert!(config.client_auth_cert_resolver.has_certs());
        let ca_only = tls_config(
            "h",
            TlsFiles {
                ca: Some(&ca),
                client: None,
            },
        )
        .expect("loads");
        assert!(!ca_only.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn bad_files_name_the_key_and_the_path_never_the_content() {
        let dir = ca_dir();
        let (ca, cert, key, server_key) = (
            path(&dir, "ca.pem"),
            path(&dir, "client.pem"),
            path(&dir, "client.key"),
            path(&dir, "server.key"),
        );
        let missing = path(&dir, "nope.pem");
        let e = err(TlsFiles {
            ca: Some(&missing),
            client: None,
        });
        assert!(
            e.contains(&format!(
                "\"certificate_ca_path\" {missing}: cannot read it"
            )),
            "{e}"
        );

        // A key where the CA should be: no certificate in it.
        let e = err(TlsFiles {
            ca: Some(&key),
            client: None,
        });
        assert!(
            e.contains(&format!(
                "\"certificate_ca_path\" {key}: holds no PEM certificate"
            )),
            "{e}"
        );

        // A certificate where the key should be.
        let e = err(TlsFiles {
            ca: Some(&ca),
            client: Some((&cert, &cert)),
        });
        assert!(
            e.contains(&format!(
                "\"certificate_key_path\" {cert}: holds no unencrypted PEM private key"
            )),
            "{e}"
        );

        // Another certificate's key.
        let e = err(TlsFiles {
            ca: Some(&ca),
            client: Some((&cert, &server_key)),
        });
        assert!(
            e.contains("not a usable client certificate and key") && e.contains(&server_key),
            "{e}"
        );

        // Not PEM at all.
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let junk = junk.display().to_string();
        let e = err(TlsFiles {
            ca: Some(&junk),
            client: None,
        });
        assert!(
            e.contains(&format!("\"certificate_ca_path\" {junk}: not valid PEM")),
            "{e}"
        );

        // Never a line of the key files in any of these.
        let key_text = std::fs::read_to_string(&key).expect("key");
        let body_line = key_text.lines().nth(1).expect("a base64 line");
        for files in [
            TlsFiles {
                ca: Some(&key),
                client: None,
            },
            TlsFiles {
                ca: Some(&ca),
                client: Some((&key, &key)),
            },
            TlsFiles {
                ca: Some(&ca),
                client: Some((&cert, &server_key)),
            },
        ] {
            let e = err(files);
            assert!(!e.contains(body_line) && !e.contains("BEGIN"), "{e}");
        }
    }
}
