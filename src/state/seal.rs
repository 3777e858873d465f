//! Sealing of what callgate puts in the shared store: AES-256-GCM under a key derived from the
//! pseudonym key, so that Redis (and whoever reads its memory, dumps or traffic) sees call snapshots,
//! live events and forwarded requests (which may carry a number an agent typed) only as ciphertext.
//!
//! Format: 12-byte random nonce, then the ciphertext with its 16-byte tag. The additional data is the
//! purpose (`call`, `event`, `command`, …), so a sealed value cannot be replayed as another kind.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::pnr::PseudonymKey;

/// Seals and opens values of the shared store.
pub struct Seal {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(<redacted>)")
    }
}

impl Seal {
    pub fn new(key: &PseudonymKey) -> Option<Seal> {
        let bytes = key.derive("callgate shared state seal v1");
        let unbound = UnboundKey::new(&aead::AES_256_GCM, &bytes).ok()?;
        Some(Seal {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    /// `purpose` binds the value to its use.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + aead::AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// `None` when the value was not sealed by an instance with the same key for this purpose.
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_what_it_sealed_only_for_the_same_purpose_and_key() {
        let seal = Seal::new(&PseudonymKey::new(b"0123456789abcdef".to_vec())).unwrap();
        let sealed = seal.seal("call", b"hello 199001011234").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"199001011234".as_slice()));
        assert_eq!(seal.open("call", &sealed).unwrap(), b"hello 199001011234");
        assert!(seal.open("event", &sealed).is_none());
        let other = Seal::new(&PseudonymKey::new(b"another key 0123".to_vec())).unwrap();
        assert!(other.open("call", &sealed).is_none());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(seal.open("call", &tampered).is_none());
        assert!(seal.open("call", b"short").is_none());
        // Two seals of one value differ (fresh nonce).
        assert_ne!(
            seal.seal("call", b"x").unwrap(),
            seal.seal("call", b"x").unwrap()
        );
    }
}
