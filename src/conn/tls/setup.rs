//! [`TlsSetup`]: one rustls `ClientConfig` per distinct TLS setting, built
//! once from the files the settings name (CA roots or the system store, the
//! client certificate and its possibly encrypted key, the CRLs) and shared by
//! every connection. `prefer` and `require` verify nothing, as in libpq
//! (`Relaxed` still checks the handshake signatures); `verify-ca` checks the
//! chain and `verify-full` the host name too. A file that cannot be read or
//! parsed is a config error naming the setting.

use super::*;

/// One TLS setting made ready: the mode and, unless it is `disable`, the
/// rustls configuration every connection with this setting shares.
pub struct TlsSetup {
    pub mode: SslMode,
    /// Where the root certificates come from (a path, or `system`).
    pub rootcert: Option<String>,
    /// The CRL file the chain is checked against.
    pub crl: Option<String>,
    pub client_cert: bool,
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mode", &self.mode)
            .field("rootcert", &self.rootcert)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

impl TlsSetup {
    /// The setup for `params`, built on first use and shared after.
    pub fn shared(params: &TlsParams) -> Result<Arc<TlsSetup>, String> {
        static CACHE: OnceLock<Mutex<HashMap<TlsParams, Arc<TlsSetup>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(s) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(params) {
            return Ok(s.clone());
        }
        let setup = Arc::new(TlsSetup::build(params)?);
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(params.clone(), setup.clone());
        Ok(setup)
    }

    /// Builds the rustls configuration (reads and parses the PEM files).
    pub fn build(params: &TlsParams) -> Result<TlsSetup, String> {
        params.validate().map_err(|(k, m)| format!("{k} {m}"))?;
        let mode = params.mode();
        let mut setup = TlsSetup {
            mode,
            rootcert: params.sslrootcert.clone(),
            crl: params.sslcrl.clone(),
            client_cert: params.sslcert.is_some(),
            config: None,
        };
        if mode == SslMode::Disable {
            return Ok(setup);
        }
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = if mode.verifies() {
            let roots = Arc::new(load_roots(
                params.sslrootcert.as_deref().unwrap_or("system"),
            )?);
            let mut webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
            if let Some(crl) = &params.sslcrl {
                webpki = webpki.with_crls(load_crls(crl)?);
            }
            let webpki = webpki.build().map_err(|e| match &params.sslcrl {
                Some(crl) => format!("sslcrl {crl:?} (or sslrootcert): {e}"),
                None => format!("sslrootcert: {e}"),
            })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(Relaxed {
                    chain: Some(webpki),
                    provider: provider.clone(),
                })
            }
        } else {
            Arc::new(Relaxed {
                chain: None,
                provider: provider.clone(),
            })
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&params.sslcert, &params.sslkey) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("sslcert {cert:?}: not a PEM certificate file: {e}"))?;
                if chain.is_empty() {
                    return Err(format!("sslcert {cert:?} holds no certificate"));
                }
                let key_der = load_key(key, params.sslpassword.as_deref())?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        setup.config = Some(Arc::new(config));
        Ok(setup)
    }

    /// A setup with tokio-postgres's own mode only (no files).
    pub fn for_mode(mode: tokio_postgres::config::SslMode) -> Arc<TlsSetup> {
        let sslmode = match mode {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        TlsSetup::shared(&TlsParams {
            sslmode: Some(sslmode),
            ..Default::default()
        })
        .expect("a setting without files always builds")
    }

    pub(super) fn connector(&self) -> Option<tokio_rustls::TlsConnector> {
        self.config.clone().map(tokio_rustls::TlsConnector::from)
    }
}

/// Reads the client key `path`: an unencrypted PEM key (PKCS#8, PKCS#1 or
/// SEC1), or a PKCS#8 encrypted one (`BEGIN ENCRYPTED PRIVATE KEY`, what
/// `openssl pkcs8 -topk8 -v2 aes-256-cbc` writes) decrypted with
/// `password`. The error names the key that fixes it and never holds the
/// password or key material.
pub(super) fn load_key(
    path: &str,
    password: Option<&str>,
) -> Result<PrivateKeyDer<'static>, String> {
    use pkcs8::der::zeroize::Zeroizing;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("sslkey {path:?}: cannot be read as a PEM file: {e}"))?,
    );
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "sslkey {path:?} is encrypted in the legacy OpenSSL format (Proc-Type: 4,ENCRYPTED), which pgferry cannot read: convert it to an encrypted PKCS#8 key (openssl pkcs8 -topk8 -v2 aes-256-cbc -in OLD -out NEW) and keep sslpassword"
        ));
    }
    if !text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| format!("sslkey {path:?}: not a PEM private key: {e}"));
    }
    let Some(password) = password else {
        return Err(format!(
            "sslpassword is not set, but sslkey {path:?} is encrypted: set sslpassword to its password (in source.url or [source.tls])"
        ));
    };
    let (label, doc) = pkcs8::Document::from_pem(&text)
        .map_err(|e| format!("sslkey {path:?}: not a valid encrypted PKCS#8 PEM key: {e}"))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(format!("sslkey {path:?}: unexpected PEM block {label:?}"));
    }
    let info = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
        .map_err(|e| format!("sslkey {path:?}: not a valid encrypted PKCS#8 key: {e}"))?;
    // A wrong password shows as bad padding (pkcs5 0.7 reports it as
    // EncryptFailed) or, rarely, as a plaintext that is not DER.
    let plain = info.decrypt(password).map_err(|e| match e {
        pkcs8::Error::EncryptedPrivateKey(
            pkcs8::pkcs5::Error::DecryptFailed | pkcs8::pkcs5::Error::EncryptFailed,
        )
        | pkcs8::Error::Asn1(_) => format!(
            "sslpassword does not decrypt sslkey {path:?}: the password is wrong"
        ),
        e => format!(
            "sslkey {path:?}: cannot decrypt it ({e}): check sslpassword; pgferry reads PBES2 keys (PBKDF2 or scrypt with AES-CBC): re-encrypt with openssl pkcs8 -topk8 -v2 aes-256-cbc"
        ),
    })?;
    Ok(PrivateKeyDer::Pkcs8(plain.as_bytes().to_vec().into()))
}

/// The CRLs of `path` (PEM, `BEGIN X509 CRL`), as libpq's `sslcrl` reads.
pub(super) fn load_crls(
    path: &str,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    let crls = rustls::pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslcrl {path:?}: not a PEM CRL file: {e}"))?;
    if crls.is_empty() {
        return Err(format!(
            "sslcrl {path:?} holds no CRL (PEM `BEGIN X509 CRL` expected; convert a DER one with openssl crl -inform DER)"
        ));
    }
    Ok(crls)
}

pub(super) fn load_roots(rootcert: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if rootcert == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(
                "sslrootcert=system: the system trust store holds no certificate (install ca-certificates, or give sslrootcert a CA file)".into(),
            );
        }
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(rootcert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert {rootcert:?}: not a PEM certificate file: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {rootcert:?} holds no usable CA certificate (PEM expected)"
        ));
    }
    Ok(roots)
}

/// `verify-ca` (the chain is checked against the roots, the name is not)
/// and `prefer`/`require` (`chain: None`: nothing is checked). The
/// handshake's signatures are checked in both.
#[derive(Debug)]
pub(super) struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
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
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
