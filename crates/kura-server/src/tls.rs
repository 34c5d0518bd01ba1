//! The server's TLS identity: the configured certificate, or a self-signed one generated on
//! first start (kept in the state directory) whose SHA-256 fingerprint clients pin.

use crate::ServerError;
use crate::config::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// A ready TLS configuration and the fingerprint of the certificate it presents.
pub struct Identity {
    /// For the listener.
    pub config: Arc<rustls::ServerConfig>,
    /// `sha256:<hex>` of the leaf certificate.
    pub fingerprint: String,
    /// True when the certificate was generated just now.
    pub generated: bool,
}

fn tls_err(what: &Path, e: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(format!("{}: {e}", what.display()))
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), ServerError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| tls_err(path, e))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| tls_err(path, e))
}

/// Generates a self-signed certificate for `names` into `dir` (cert.pem, key.pem 0600).
fn generate(dir: &Path, names: Vec<String>) -> Result<(), ServerError> {
    std::fs::create_dir_all(dir).map_err(|e| tls_err(dir, e))?;
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| tls_err(dir, e))?;
    // Key first: a crash between the two leaves no certificate without its key.
    write_private(&dir.join("key.pem"), ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&dir.join("cert.pem"), ck.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Loads the configured certificate or the generated one, generating it on first start.
pub fn identity(cfg: &ServerConfig) -> Result<Identity, ServerError> {
    let (cert, key, generated) = match &cfg.tls {
        Some(files) => (files.cert.clone(), files.key.clone(), false),
        None => {
            let dir = cfg.state_dir.join("tls");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let fresh = !cert.exists();
            if fresh {
                // A key left by a crash before its certificate was written is replaced.
                let _ = std::fs::remove_file(&key);
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
                let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
                names.extend((!host.is_empty()).then_some(host));
                generate(&dir, names)?;
            }
            (cert, key, fresh)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| tls_err(&cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&cert, e))?;
    let leaf = chain.first().ok_or_else(|| tls_err(&cert, "no certificate in the file"))?;
    let fingerprint = kura_store::remote::fingerprint_of(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| tls_err(&key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(&cert, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity { config: Arc::new(config), fingerprint, generated })
}
