//! The rustls client configuration of a BankID client: the configured root as the only trust anchor and
//! the RP identity (PKCS#12 or PEM) for mutual TLS.
//!
//! Invariant: no system or bundled web roots are ever added; every file problem is reported with the
//! file's path and never with its contents (keys and passwords stay out of messages).

use std::path::Path;
use std::sync::Arc;

use p12_keystore::{KeyStore, Pkcs12ImportPolicy};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::client::Error;
use crate::idp::ClientIdentity;

/// The crypto provider used by every TLS endpoint in `idp` (client and simulator).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client configuration: trust only `server_ca` (nothing when `None`, which refuses every
/// server: used for plain-HTTP clients, which never handshake), authenticate with `identity`.
pub(crate) fn client_config(
    server_ca: Option<&Path>,
    identity: Option<&ClientIdentity>,
) -> Result<ClientConfig, Error> {
    let mut roots = RootCertStore::empty();
    if let Some(path) = server_ca {
        let certs = read_certs(path)?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Error::Pem {
                path: path.to_owned(),
                reason: "no usable CA certificate".into(),
            });
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let (chain, key) = load_identity(identity)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Identity {
                    path: identity_path(identity).to_owned(),
                    reason: e.to_string(),
                })?
        }
    };
    Ok(config)
}

fn identity_path(identity: &ClientIdentity) -> &Path {
    match identity {
        ClientIdentity::Pkcs12 { path, .. } => path,
        ClientIdentity::Pem { cert, .. } => cert,
    }
}

/// When the RP certificate (the leaf of the configured identity) stops being valid.
pub(crate) fn identity_not_after(identity: &ClientIdentity) -> Result<OffsetDateTime, Error> {
    let (chain, _key) = load_identity(identity)?;
    let path = identity_path(identity);
    chain
        .first()
        .and_then(|leaf| x509_validity(leaf))
        .map(|(_, not_after)| not_after)
        .ok_or_else(|| Error::Identity {
            path: path.to_owned(),
            reason: "the RP certificate's validity cannot be read".into(),
        })
}

/// When the first certificate of a CA file stops being valid (the earliest end among them).
pub(crate) fn ca_not_after(path: &Path) -> Result<OffsetDateTime, Error> {
    read_certs(path)?
        .iter()
        .filter_map(|c| x509_validity(c))
        .map(|(_, not_after)| not_after)
        .min()
        .ok_or_else(|| Error::Pem {
            path: path.to_owned(),
            reason: "no certificate validity could be read".into(),
        })
}

/// Loads the RP certificate chain (leaf first) and its private key.
pub(crate) fn load_identity(
    identity: &ClientIdentity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    match identity {
        ClientIdentity::Pkcs12 { path, password } => {
            let data = read(path)?;
            let store = KeyStore::from_pkcs12(&data, password.expose(), Pkcs12ImportPolicy::Strict)
                .map_err(|e| match e {
                    p12_keystore::error::Error::MacError(_) => Error::Pkcs12Password {
                        path: path.to_owned(),
                    },
                    p12_keystore::error::Error::UnsupportedEncryptionScheme => Error::Identity {
                        path: path.to_owned(),
                        reason: "legacy PKCS#12 encryption (RC2/3DES) is not supported; use the \
                                 AES (PBES2) file or re-export it with AES-256"
                            .into(),
                    },
                    other => Error::Identity {
                        path: path.to_owned(),
                        reason: format!("not a readable PKCS#12 file ({other})"),
                    },
                })?;
            let Some((_alias, chain)) = store.private_key_chain() else {
                return Err(Error::Identity {
                    path: path.to_owned(),
                    reason: "no private key with a matching certificate".into(),
                });
            };
            let certs: Vec<CertificateDer<'static>> = chain
                .certs()
                .iter()
                .map(|c| CertificateDer::from(c.as_der().to_vec()))
                .collect();
            if certs.is_empty() {
                return Err(Error::Identity {
                    path: path.to_owned(),
                    reason: "no certificate for the private key".into(),
                });
            }
            check_v3(path, &certs)?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
            Ok((certs, key))
        }
        ClientIdentity::Pem { cert, key } => {
            let certs = read_certs(cert)?;
            check_v3(cert, &certs)?;
            let key_pem = read(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::Pem {
                path: key.to_owned(),
                reason: format!(
                    "no unencrypted private key (PKCS#8, RSA or SEC1) found ({e}); \
                     an encrypted key must be decrypted first"
                ),
            })?;
            Ok((certs, key_der))
        }
    }
}

/// Refuses an RP chain with a certificate older than X.509 v3. rustls would send it, and the server
/// would refuse the handshake with an error ("UnsupportedCertVersion") that reads as its own fault.
fn check_v3(path: &Path, chain: &[CertificateDer<'_>]) -> Result<(), Error> {
    for (n, cert) in chain.iter().enumerate() {
        let Some(version) = x509_version(cert) else {
            // Not parsable here: left to rustls and the server, which report it.
            continue;
        };
        if version == 3 {
            continue;
        }
        let reason = if n == 0 {
            format!(
                "the RP certificate is X.509 v{version}; it must be X.509 v3 \
                 (have it issued again as v3)"
            )
        } else {
            format!(
                "certificate {} in the chain (an issuer of the RP certificate) is X.509 \
                 v{version}; every certificate of the RP chain must be X.509 v3",
                n + 1
            )
        };
        return Err(Error::Identity {
            path: path.to_owned(),
            reason,
        });
    }
    Ok(())
}

/// The X.509 version (1, 2 or 3) of a DER certificate, or `None` when it does not parse that far.
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] EXPLICIT version DEFAULT v1, … } … }`,
/// where the version is stored as 0, 1 or 2.
pub(super) fn x509_version(der: &[u8]) -> Option<u8> {
    let (_, certificate) = der_element(der, 0x30)?;
    let (_, tbs) = der_element(certificate, 0x30)?;
    if tbs.first() != Some(&0xa0) {
        return Some(1);
    }
    let (_, explicit) = der_element(tbs, 0xa0)?;
    let (_, value) = der_element(explicit, 0x02)?;
    match value {
        [v @ 0..=2] => Some(v + 1),
        _ => None,
    }
}

/// The validity period (`notBefore`, `notAfter`) of a DER certificate, or `None` when it does not
/// parse that far. `tbsCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER,
/// signature AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore Time, notAfter Time }, … }`.
pub(crate) fn x509_validity(der: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (_, certificate) = der_element(der, 0x30)?;
    let (_, mut tbs) = der_element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.0;
    }
    let (rest, _serial) = der_element(tbs, 0x02)?;
    let (rest, _signature) = der_element(rest, 0x30)?;
    let (rest, _issuer) = der_element(rest, 0x30)?;
    let (_, validity) = der_element(rest, 0x30)?;
    let (rest, not_before) = der_time(validity)?;
    let (_, not_after) = der_time(rest)?;
    Some((not_before, not_after))
}

/// `Time ::= CHOICE { utcTime (YYMMDDHHMMSSZ), generalTime (YYYYMMDDHHMMSSZ) }` at the start of `input`.
fn der_time(input: &[u8]) -> Option<(&[u8], OffsetDateTime)> {
    let (tag, year_digits) = match input.first()? {
        0x17 => (0x17, 2),
        0x18 => (0x18, 4),
        _ => return None,
    };
    let (rest, text) = der_element(input, tag)?;
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if text.len() != year_digits + 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |from: usize, len: usize| text.get(from..from + len)?.parse::<i32>().ok();
    let mut year = num(0, year_digits)?;
    if year_digits == 2 {
        // RFC 5280: UTCTime years 50..99 are 19xx, 00..49 are 20xx.
        year += if year >= 50 { 1900 } else { 2000 };
    }
    let at = |i: usize| num(year_digits + i * 2, 2).and_then(|v| u8::try_from(v).ok());
    let month = time::Month::try_from(at(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, at(1)?).ok()?;
    let time = time::Time::from_hms(at(2)?, at(3)?, at(4)?).ok()?;
    Some((rest, time::PrimitiveDateTime::new(date, time).assume_utc()))
}

/// Splits the DER element with `tag` at the start of `input` into (the rest, its contents).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else {
        let octets = usize::from(len & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let (bytes, rest) = rest.split_at(octets);
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((rest, contents))
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: path.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}
