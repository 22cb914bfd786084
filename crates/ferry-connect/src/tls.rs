//! TLS for connections over TCP, the way libpq's `sslmode` asks for it (rustls, no OpenSSL):
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` | when the server offers it | not checked |
//! | `require` | always | checked against `sslrootcert` when that file exists (as libpq does), else not checked |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | signed by a CA of `sslrootcert`, and made out to the host connected to |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt`; a client certificate is presented when
//! `sslcert` and `sslkey` (default `~/.postgresql/postgresql.crt` and `.key`) exist. Unix
//! sockets never use TLS, as with libpq.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// TLS settings that cannot be used: what is wrong (naming the file and the key that named
/// it), with the library's error behind it as the `source()` when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsSetupError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TlsSetupError {
    /// A problem said in one sentence.
    fn new(message: impl Into<String>) -> TlsSetupError {
        TlsSetupError {
            message: message.into(),
            source: None,
        }
    }

    /// A problem with the error that showed it.
    fn caused_by(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TlsSetupError {
        TlsSetupError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing: the connection is encrypted, but the server is not authenticated.
    Nothing,
    /// The certificate chain, up to a CA of the root file.
    Chain,
    /// The chain, and that the certificate names the host connected to.
    ChainAndName,
}

/// What a connection string says about TLS, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub verify: Verify,
    /// The CA file, when certificates are checked.
    pub root_cert: Option<PathBuf>,
    /// The client certificate and its key, when both exist.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    /// The settings for `sslmode` (one of prefer, allow, require, verify-ca, verify-full) and the
    /// given file parameters; `home` is where `~/.postgresql` lives. An error says what is
    /// missing and what to do.
    pub(crate) fn new(
        mode: &str,
        sslrootcert: Option<&str>,
        sslcert: Option<&str>,
        sslkey: Option<&str>,
        home: Option<&Path>,
    ) -> Result<TlsSettings, TlsSetupError> {
        let default = |name: &str| home.map(|h| h.join(".postgresql").join(name));
        let root_given = sslrootcert.map(PathBuf::from);
        let root = root_given.clone().or_else(|| default("root.crt"));
        let verify = match mode {
            "allow" | "prefer" => Verify::Nothing,
            // libpq: require checks the chain when a root file exists
            "require" if root.as_deref().is_some_and(Path::exists) => Verify::Chain,
            "require" => Verify::Nothing,
            "verify-ca" => Verify::Chain,
            _ => Verify::ChainAndName,
        };
        let root_cert = match verify {
            Verify::Nothing => None,
            _ => match root {
                Some(path) if path.exists() => Some(path),
                Some(path) => {
                    return Err(TlsSetupError::new(format!(
                        "sslmode={mode} checks the server's certificate, but the root certificate file \"{}\" does not exist: give the CA's certificate with sslrootcert=FILE, or use sslmode=require to encrypt without checking",
                        path.display()
                    )))
                }
                None => {
                    return Err(TlsSetupError::new(format!(
                        "sslmode={mode} checks the server's certificate: give the CA's certificate with sslrootcert=FILE"
                    )))
                }
            },
        };
        let cert = sslcert
            .map(PathBuf::from)
            .or_else(|| default("postgresql.crt"));
        let key = sslkey
            .map(PathBuf::from)
            .or_else(|| default("postgresql.key"));
        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) if cert.exists() && key.exists() => Some((cert, key)),
            (Some(cert), _) if sslcert.is_some() && !cert.exists() => {
                return Err(TlsSetupError::new(format!(
                    "the client certificate file \"{}\" (sslcert) does not exist",
                    cert.display()
                )))
            }
            (Some(_), Some(key)) if sslcert.is_some() => {
                return Err(TlsSetupError::new(format!(
                    "the client certificate's key file \"{}\" (sslkey) does not exist",
                    key.display()
                )))
            }
            _ => None,
        };
        Ok(TlsSettings {
            verify,
            root_cert,
            client_cert,
        })
    }

    /// The rustls client configuration these settings make.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::caused_by("TLS setup", e))?;
        let algorithms = provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.root_cert, self.verify) {
            (Some(root), Verify::Chain | Verify::ChainAndName) => {
                let roots = read_roots(root)?;
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| {
                        TlsSetupError::caused_by(
                            format!("root certificate file \"{}\"", root.display()),
                            e,
                        )
                    })?;
                if self.verify == Verify::Chain {
                    Arc::new(AnyName { inner: webpki })
                } else {
                    webpki
                }
            }
            _ => Arc::new(Unchecked { algorithms }),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        TlsSetupError::caused_by(
                            format!("client certificate file \"{}\"", cert.display()),
                            e,
                        )
                    })?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    TlsSetupError::caused_by(format!("client key file \"{}\"", key.display()), e)
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    TlsSetupError::caused_by(
                        format!("client certificate \"{}\"", cert.display()),
                        e,
                    )
                })
            }
        }
    }
}

/// Every certificate of a PEM file, as trust anchors.
fn read_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsSetupError::caused_by(format!("root certificate file \"{}\"", path.display()), e)
        })?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError::new(format!(
            "root certificate file \"{}\" holds no usable certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// verify-ca: the chain is checked, the name is not.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// prefer and require without a root file: any certificate (the handshake's signatures are
/// still checked, so the session is encrypted to whoever holds the certificate's key).
#[derive(Debug)]
struct Unchecked {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_checks_like_libpq() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        let s = |mode, root| TlsSettings::new(mode, root, None, None, Some(home));
        assert_eq!(s("prefer", None).unwrap().verify, Verify::Nothing);
        assert_eq!(s("require", None).unwrap().verify, Verify::Nothing);
        let err = s("verify-full", None).unwrap_err().to_string();
        assert!(
            err.contains("root.crt") && err.contains("sslrootcert"),
            "{err}"
        );
        let err = s("verify-ca", Some("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");

        // a root file in ~/.postgresql turns require into verify-ca, as in libpq
        std::fs::create_dir_all(home.join(".postgresql")).unwrap();
        std::fs::write(home.join(".postgresql/root.crt"), "x").unwrap();
        let require = s("require", None).unwrap();
        assert_eq!(require.verify, Verify::Chain);
        assert_eq!(require.root_cert, Some(home.join(".postgresql/root.crt")));
        assert_eq!(s("verify-full", None).unwrap().verify, Verify::ChainAndName);

        let err = TlsSettings::new(
            "require",
            None,
            Some("/nonexistent/c.crt"),
            None,
            Some(home),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslcert"), "{err}");
    }

    #[test]
    fn a_root_file_without_certificates_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ca.pem");
        std::fs::write(&root, "not a certificate\n").unwrap();
        let settings = TlsSettings::new(
            "verify-full",
            Some(root.to_str().unwrap()),
            None,
            None,
            None,
        )
        .unwrap();
        let err = settings.client_config().unwrap_err().to_string();
        assert!(err.contains("no usable certificate"), "{err}");
    }
}
