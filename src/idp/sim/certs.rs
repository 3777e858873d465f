//! Throw-away PKI for the TLS simulator: a server root and server certificate for 127.0.0.1/localhost,
//! a client root and an RP client certificate, written as PEM files and as an AES PKCS#12 file.
//!
//! Invariant: the server accepts only client certificates issued by its own generated client root; key
//! files are created owner-readable only (on Unix).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use p12_keystore::{Certificate as P12Cert, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Error;
use crate::idp::bankid::tls_provider;
use crate::idp::{BankIdSettings, ClientIdentity};
use crate::secret::Secret;

/// The files a TLS simulator writes, ready for a client's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFiles {
    pub dir: PathBuf,
    /// The server root (PEM): the client's `server_ca`.
    pub server_ca: PathBuf,
    /// Client certificate chain (PEM, leaf first).
    pub client_cert: PathBuf,
    /// Client private key (PEM, unencrypted PKCS#8).
    pub client_key: PathBuf,
    /// Client identity as PKCS#12 (PBES2/AES-256-CBC, HMAC-SHA-256 MAC).
    pub client_p12: PathBuf,
    /// The generated password of `client_p12`.
    pub p12_password: Secret,
}

impl SimFiles {
    /// The PKCS#12 identity.
    pub fn pkcs12_identity(&self) -> ClientIdentity {
        ClientIdentity::Pkcs12 {
            path: self.client_p12.clone(),
            password: self.p12_password.clone(),
        }
    }

    /// The PEM identity.
    pub fn pem_identity(&self) -> ClientIdentity {
        ClientIdentity::Pem {
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }

    /// Client settings for `url` with the given identity.
    pub(crate) fn settings(&self, url: String, identity: ClientIdentity) -> BankIdSettings {
        BankIdSettings {
            url,
            identity: Some(identity),
            server_ca: Some(self.server_ca.clone()),
            ..BankIdSettings::default()
        }
    }
}

pub(crate) struct Material {
    pub files: SimFiles,
    pub server_config: Arc<ServerConfig>,
}

fn pki(e: impl std::fmt::Display) -> Error {
    Error::Pki(e.to_string())
}

/// Common name of the simulator's RP (client) root.
const RP_ROOT: &str = "callgate simulator RP root";
/// File of the RP root's private key in the certificate directory.
const RP_ROOT_KEY: &str = "client-ca.key";

fn ca(name: &str) -> Result<(CertificateParams, KeyPair, CertificateDer<'static>), Error> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "callgate simulator");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(pki)?;
    let cert = params.self_signed(&key).map_err(pki)?;
    Ok((params, key, cert.der().clone()))
}

fn leaf(
    name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(KeyPair, CertificateDer<'static>), Error> {
    let mut params = CertificateParams::new(sans).map_err(pki)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().map_err(pki)?;
    let cert = params.signed_by(&key, issuer).map_err(pki)?;
    Ok((key, cert.der().clone()))
}

/// A client identity (certificate + key) issued by a fresh, unrelated root; for tests of refusal.
#[cfg(test)]
pub(crate) fn foreign_client(dir: &Path) -> Result<ClientIdentity, Error> {
    let (params, key, _root) = ca("foreign root")?;
    let issuer = Issuer::new(params, key);
    let (key, cert) = leaf(
        "foreign client",
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        &issuer,
    )?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let cert_path = dir.join("foreign-client.pem");
    let key_path = dir.join("foreign-client.key");
    write(&cert_path, pem("CERTIFICATE", &cert).as_bytes(), false)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    Ok(ClientIdentity::Pem {
        cert: cert_path,
        key: key_path,
    })
}

/// Issues another RP certificate from the simulator's RP root in `files.dir`, valid from `not_before`
/// until `not_after` (e.g. one that has expired, to see it refused), and writes it as
/// `<name>.p12` (with the simulator's PKCS#12 password), `<name>.pem` and `<name>.key`. Returns the
/// PKCS#12 identity.
pub fn issue_rp_certificate(
    files: &SimFiles,
    name: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<ClientIdentity, Error> {
    let key_path = files.dir.join(RP_ROOT_KEY);
    let root_key = std::fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?;
    let root_key = KeyPair::from_pem(&root_key).map_err(pki)?;
    let (root_params, _, _) = ca(RP_ROOT)?;
    let root_der = root_params
        .self_signed(&root_key)
        .map_err(pki)?
        .der()
        .clone();
    let issuer = Issuer::new(root_params, root_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("callgate simulator RP ({name})"),
    );
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(pki)?;
    let cert = params.signed_by(&key, &issuer).map_err(pki)?.der().clone();
    let chain = format!(
        "{}{}",
        pem("CERTIFICATE", &cert),
        pem("CERTIFICATE", &root_der)
    );
    write(
        &files.dir.join(format!("{name}.pem")),
        chain.as_bytes(),
        false,
    )?;
    write(
        &files.dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    let p12_path = files.dir.join(format!("{name}.p12"));
    let p12 = pkcs12(&key, &cert, &root_der, files.p12_password.expose())?;
    write(&p12_path, &p12, true)?;
    Ok(ClientIdentity::Pkcs12 {
        path: p12_path,
        password: files.p12_password.clone(),
    })
}

/// Writes a self-signed root that issued nothing the simulator uses (PEM), e.g. to configure as a
/// `server_ca` that does not trust the simulator's server.
pub fn write_unrelated_root(path: &Path) -> Result<(), Error> {
    let (_, _, der) = ca("an unrelated root")?;
    write(path, pem("CERTIFICATE", &der).as_bytes(), false)
}

fn pkcs12(
    key: &KeyPair,
    cert: &CertificateDer<'_>,
    root: &CertificateDer<'_>,
    password: &str,
) -> Result<Vec<u8>, Error> {
    let mut store = KeyStore::new();
    let chain = PrivateKeyChain::new(
        "callgate-sim-rp",
        PrivateKey::from_der(&key.serialize_der()).map_err(pki)?,
        [
            P12Cert::from_der(cert).map_err(pki)?,
            P12Cert::from_der(root).map_err(pki)?,
        ],
    );
    store.add_entry("callgate-sim-rp", KeyStoreEntry::PrivateKeyChain(chain));
    store
        .writer(password)
        .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
        .write()
        .map_err(pki)
}

/// Generates the PKI, writes the files into `dir` and builds the server's TLS configuration.
pub(crate) fn generate(dir: &Path) -> Result<Material, Error> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;

    let (server_ca_params, server_ca_key, server_ca_der) = ca("callgate simulator server root")?;
    let server_issuer = Issuer::new(server_ca_params, server_ca_key);
    let (server_key, server_der) = leaf(
        "localhost",
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        &server_issuer,
    )?;

    let (client_ca_params, client_ca_key, client_ca_der) = ca(RP_ROOT)?;
    // Kept so that more RP certificates can be issued later (`issue_rp_certificate`).
    write(
        &dir.join(RP_ROOT_KEY),
        client_ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    let client_issuer = Issuer::new(client_ca_params, client_ca_key);
    let (client_key, client_der) = leaf(
        "callgate simulator RP",
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        &client_issuer,
    )?;

    let password = Secret::new(fastrand_password());
    let files = SimFiles {
        dir: dir.to_owned(),
        server_ca: dir.join("server-ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        client_p12: dir.join("client.p12"),
        p12_password: password,
    };
    write(
        &files.server_ca,
        pem("CERTIFICATE", &server_ca_der).as_bytes(),
        false,
    )?;
    let chain = format!(
        "{}{}",
        pem("CERTIFICATE", &client_der),
        pem("CERTIFICATE", &client_ca_der)
    );
    write(&files.client_cert, chain.as_bytes(), false)?;
    write(
        &files.client_key,
        client_key.serialize_pem().as_bytes(),
        true,
    )?;

    let p12 = pkcs12(
        &client_key,
        &client_der,
        &client_ca_der,
        files.p12_password.expose(),
    )?;
    write(&files.client_p12, &p12, true)?;

    let mut client_roots = RootCertStore::empty();
    client_roots.add(client_ca_der).map_err(pki)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), tls_provider())
            .build()
            .map_err(pki)?;
    let server_config = ServerConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(pki)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_der],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .map_err(pki)?;
    Ok(Material {
        files,
        server_config: Arc::new(server_config),
    })
}

fn fastrand_password() -> String {
    let mut rng = fastrand::Rng::new();
    (0..24).map(|_| rng.alphanumeric()).collect()
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, data: &[u8], private: bool) -> Result<(), Error> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| io(path, e))?;
    file.write_all(data).map_err(|e| io(path, e))
}
