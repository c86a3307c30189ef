//! Webhook signing secrets at rest: sealed with XChaCha20-Poly1305 under a
//! master key, with the key's id stored beside the ciphertext so that the
//! master key can be rotated (`uploadhook keys rotate-master`).
//!
//! Master keys come from `encryption.keys` (`UPLOADHOOK_ENCRYPTION__KEYS`):
//! `id:base64(32 bytes)[,id:base64(32 bytes)…]`. The first is the active
//! key, which seals; the others only open what they sealed before. A
//! ciphertext is `base64(nonce ‖ ciphertext ‖ tag)` with a random 192-bit
//! nonce, and its associated data names the webhook, so that a ciphertext
//! copied to another row does not open.
//!
//! A row without a key id holds a secret from before encryption, in plain
//! text: it is read as such, and `rotate-master` seals it.

use base64::{Engine, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use secrecy::{ExposeSecret, SecretString};

const NONCE_LEN: usize = 24;
pub const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("is empty; expected `id:base64(32 bytes)[,id:base64…]`")]
    Empty,
    #[error("entry {0} is not `id:base64(32 bytes)`")]
    Shape(usize),
    #[error("entry {0}: the id must be 1 to 32 of [A-Za-z0-9_-]")]
    Id(usize),
    #[error("entry {0} (`{1}`): the key is not base64 of exactly 32 bytes")]
    Key(usize, String),
    #[error("key id `{0}` appears twice")]
    Duplicate(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed with master key `{0}`, which is not configured (encryption.keys)")]
    UnknownKey(String),
    #[error("ciphertext under master key `{0}` does not open (corrupt, or another row's)")]
    Open(String),
}

struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The configured master keys; the first one seals. `Debug` shows ids only.
pub struct Keyring {
    keys: Vec<MasterKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

/// A sealed secret and the id of the key that sealed it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub ciphertext: String,
}

impl Keyring {
    /// Parses `id:base64[,id:base64…]`. Errors never show key material.
    pub fn parse(spec: &str) -> Result<Self, KeyringError> {
        let mut keys: Vec<MasterKey> = Vec::new();
        for (i, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let n = i + 1;
            let (id, b64) = entry.split_once(':').ok_or(KeyringError::Shape(n))?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(KeyringError::Id(n));
            }
            let raw = STANDARD
                .decode(b64.trim())
                .ok()
                .filter(|r| r.len() == KEY_LEN)
                .ok_or_else(|| KeyringError::Key(n, id.to_string()))?;
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyringError::Duplicate(id.to_string()));
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&raw).expect("32-byte key");
            keys.push(MasterKey {
                id: id.to_string(),
                cipher,
            });
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Self { keys })
    }

    /// A new random key as one `id:base64` entry.
    pub fn generate_entry(id: &str) -> String {
        let mut raw = [0u8; KEY_LEN];
        rand::fill(&mut raw);
        format!("{id}:{}", STANDARD.encode(raw))
    }

    /// The id of the key that seals.
    pub fn active_id(&self) -> &str {
        &self.keys[0].id
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Seals `plaintext` under the active key, bound to `context` (the
    /// webhook id).
    pub fn seal(&self, plaintext: &SecretString, context: &str) -> Sealed {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let aad = aad(context);
        let ct = key
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 seals any length we store");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Sealed {
            key_id: key.id.clone(),
            ciphertext: STANDARD.encode(out),
        }
    }

    /// Opens a stored secret. `key_id` None: a legacy plain-text row.
    pub fn open(
        &self,
        key_id: Option<&str>,
        stored: &str,
        context: &str,
    ) -> Result<SecretString, SealError> {
        let Some(key_id) = key_id else {
            return Ok(SecretString::from(stored.to_string()));
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| SealError::UnknownKey(key_id.to_string()))?;
        let open_err = || SealError::Open(key_id.to_string());
        let raw = STANDARD.decode(stored).map_err(|_| open_err())?;
        if raw.len() < NONCE_LEN {
            return Err(open_err());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| open_err())?;
        let aad = aad(context);
        let pt = key
            .cipher
            .decrypt(&nonce, Payload { msg: ct, aad: &aad })
            .map_err(|_| open_err())?;
        String::from_utf8(pt)
            .map(SecretString::from)
            .map_err(|_| open_err())
    }
}

fn aad(context: &str) -> Vec<u8> {
    format!("uploadhook/webhook-secret/v1/{context}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> Keyring {
        Keyring::parse(spec).unwrap()
    }

    #[test]
    fn seals_and_opens_under_the_active_key() {
        let k = ring(&format!(
            "{},{}",
            Keyring::generate_entry("k2"),
            Keyring::generate_entry("k1")
        ));
        assert_eq!(k.active_id(), "k2");
        let secret = SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string());
        let sealed = k.seal(&secret, "wh_1");
        assert_eq!(sealed.key_id, "k2");
        assert!(!sealed.ciphertext.contains("MfKQ9r8GKYqr"));
        let opened = k.open(Some("k2"), &sealed.ciphertext, "wh_1").unwrap();
        assert_eq!(opened.expose_secret(), secret.expose_secret());
        // Fresh nonce every time.
        assert_ne!(k.seal(&secret, "wh_1").ciphertext, sealed.ciphertext);
    }

    #[test]
    fn another_rows_ciphertext_or_key_does_not_open() {
        let a = Keyring::generate_entry("a");
        let k = ring(&a);
        let sealed = k.seal(&SecretString::from("s".to_string()), "wh_1");
        assert_eq!(
            k.open(Some("a"), &sealed.ciphertext, "wh_2").unwrap_err(),
            SealError::Open("a".into())
        );
        assert_eq!(
            k.open(Some("b"), &sealed.ciphertext, "wh_1").unwrap_err(),
            SealError::UnknownKey("b".into())
        );
        // Same id, different key material.
        let other = ring(&Keyring::generate_entry("a"));
        assert!(other.open(Some("a"), &sealed.ciphertext, "wh_1").is_err());
        // An older key still opens what it sealed once it is not active.
        let rotated = ring(&format!("{},{a}", Keyring::generate_entry("new")));
        assert_eq!(
            rotated
                .open(Some("a"), &sealed.ciphertext, "wh_1")
                .unwrap()
                .expose_secret(),
            "s"
        );
    }

    #[test]
    fn legacy_rows_are_plain_text() {
        let k = ring(&Keyring::generate_entry("a"));
        assert_eq!(
            k.open(None, "whsec_plain", "wh_1").unwrap().expose_secret(),
            "whsec_plain"
        );
    }

    #[test]
    fn parse_errors_name_the_entry_and_never_the_key() {
        assert_eq!(Keyring::parse(" , ").unwrap_err(), KeyringError::Empty);
        assert_eq!(
            Keyring::parse("nocolon").unwrap_err(),
            KeyringError::Shape(1)
        );
        let short = format!("k1:{}", STANDARD.encode([7u8; 16]));
        let err =
            Keyring::parse(&format!("{},{short}", Keyring::generate_entry("k0"))).unwrap_err();
        assert_eq!(err, KeyringError::Key(2, "k1".into()));
        assert!(!err.to_string().contains(&STANDARD.encode([7u8; 16])));
        assert_eq!(
            Keyring::parse(&format!("bad id:{}", STANDARD.encode([0u8; 32]))).unwrap_err(),
            KeyringError::Id(1)
        );
        let e = Keyring::generate_entry("x");
        assert_eq!(
            Keyring::parse(&format!("{e},{e}")).unwrap_err(),
            KeyringError::Duplicate("x".into())
        );
        let k = ring(&e);
        assert_eq!(format!("{k:?}"), "Keyring { ids: [\"x\"] }");
    }
}
