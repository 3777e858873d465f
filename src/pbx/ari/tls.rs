//! TLS client configuration shared by the REST client and the events websocket.
//!
//! Invariant: the ring provider is always passed explicitly (no process-wide default is installed);
//! trust roots come from the system bundle (`SSL_CERT_FILE` or the usual distribution paths).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A rustls client config trusting the system's CA bundle. With no readable bundle the root store is
/// empty, which only matters for `https`/`wss` URLs (the handshake is then refused).
pub(crate) fn client_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    let env = std::env::var("SSL_CERT_FILE").ok();
    let paths = env
        .iter()
        .map(String::as_str)
        .chain(BUNDLES.iter().copied());
    for path in paths {
        let Ok(iter) = CertificateDer::pem_file_iter(path) else {
            continue;
        };
        let certs: Vec<_> = iter.filter_map(Result::ok).collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added > 0 {
            break;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
