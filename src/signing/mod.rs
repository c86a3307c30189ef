//! Webhook signatures.
//!
//! The [Standard Webhooks] scheme: `webhook-signature: v1,<base64 HMAC-SHA256
//! of "{id}.{timestamp}.{body}">`, keyed by the base64-decoded part of a
//! `whsec_…` secret. The timestamp is inside the signed content, which is
//! what stops replays: receivers reject timestamps outside a tolerance.
//!
//! For receivers of the earlier scheme, `X-Webhook-Signature: sha256=<hex
//! HMAC-SHA256 of the body>` is sent too, with the same key. It does not
//! cover the timestamp, so it does not protect against replay.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const SECRET_PREFIX: &str = "whsec_";

/// A signing key decoded from `whsec_<base64>`.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("must start with `whsec_`")]
    Prefix,
    #[error("is not valid base64 after `whsec_`")]
    Base64,
    #[error("must decode to 24 to 64 bytes")]
    Length,
}

impl SigningKey {
    /// Parses `whsec_<base64>`.
    pub fn from_secret(secret: &str) -> Result<Self, SecretError> {
        let b64 = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let bytes = STANDARD.decode(b64).map_err(|_| SecretError::Base64)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(SecretError::Length);
        }
        Ok(Self(bytes))
    }

    /// A new random secret, `whsec_` + base64 of 32 bytes.
    pub fn generate_secret() -> String {
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        format!("{SECRET_PREFIX}{}", STANDARD.encode(raw))
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("hmac takes any key length")
    }

    /// `v1,<base64>` over `{msg_id}.{timestamp}.{payload}`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, payload: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// `sha256=<hex>` over the body alone (the seed plan's header).
    pub fn sign_body_hex(&self, payload: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(payload);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("secret {0}")]
    Secret(#[from] SecretError),
    #[error("timestamp is outside the tolerance")]
    Timestamp,
    #[error("no matching signature")]
    Signature,
}

/// Verifies a Standard Webhooks request, for Rust receivers.
///
/// `signatures` is the `webhook-signature` header: space-separated
/// `v1,<base64>` entries (several during a secret rotation); one must match.
/// `now` and `tolerance_secs` bound the `webhook-timestamp` (the spec
/// suggests 5 minutes) so that a captured request cannot be replayed later.
pub fn verify(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    payload: &[u8],
    signatures: &str,
    now: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let key = SigningKey::from_secret(secret)?;
    if now.abs_diff(timestamp) > tolerance_secs.unsigned_abs() {
        return Err(VerifyError::Timestamp);
    }
    let expected = key.sign(msg_id, timestamp, payload);
    let expected = expected.as_bytes();
    let found = signatures
        .split_whitespace()
        .any(|candidate| constant_time_eq(candidate.as_bytes(), expected));
    if found {
        Ok(())
    } else {
        Err(VerifyError::Signature)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        secret: String,
        msg_id: String,
        timestamp: i64,
        payload: String,
        signature: String,
    }

    #[derive(serde::Deserialize)]
    struct Vectors {
        valid: Vec<Vector>,
        invalid: Vec<Vector>,
    }

    fn vectors() -> Vectors {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/conformance/standard-webhooks-vectors.json"
        );
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {path}: {e} (shared/ must sit beside the repo)"));
        serde_json::from_str(&text).expect("vectors parse")
    }

    #[test]
    fn signs_every_valid_vector_exactly() {
        let v = vectors();
        assert!(!v.valid.is_empty());
        for t in &v.valid {
            let key = SigningKey::from_secret(&t.secret).unwrap();
            assert_eq!(
                key.sign(&t.msg_id, t.timestamp, t.payload.as_bytes()),
                t.signature
            );
            verify(
                &t.secret,
                &t.msg_id,
                t.timestamp,
                t.payload.as_bytes(),
                &t.signature,
                t.timestamp,
                300,
            )
            .unwrap();
        }
    }

    #[test]
    fn rejects_every_invalid_vector() {
        let v = vectors();
        assert!(!v.invalid.is_empty());
        for t in &v.invalid {
            let key = SigningKey::from_secret(&t.secret).unwrap();
            assert_ne!(
                key.sign(&t.msg_id, t.timestamp, t.payload.as_bytes()),
                t.signature
            );
            assert_eq!(
                verify(
                    &t.secret,
                    &t.msg_id,
                    t.timestamp,
                    t.payload.as_bytes(),
                    &t.signature,
                    t.timestamp,
                    300
                ),
                Err(VerifyError::Signature)
            );
        }
    }

    #[test]
    fn verify_accepts_any_of_several_signatures_and_checks_time() {
        let secret = SigningKey::generate_secret();
        let key = SigningKey::from_secret(&secret).unwrap();
        let sig = key.sign("wh_1", 1000, b"{}");
        let header = format!("v1,AAAA {sig}");
        verify(&secret, "wh_1", 1000, b"{}", &header, 1100, 300).unwrap();
        assert_eq!(
            verify(&secret, "wh_1", 1000, b"{}", &header, 2000, 300),
            Err(VerifyError::Timestamp)
        );
        assert_eq!(
            verify(&secret, "wh_1", 1000, b"{ }", &header, 1000, 300),
            Err(VerifyError::Signature)
        );
    }

    #[test]
    fn secrets_are_validated() {
        assert_eq!(
            SigningKey::from_secret("abc").unwrap_err(),
            SecretError::Prefix
        );
        assert_eq!(
            SigningKey::from_secret("whsec_!!").unwrap_err(),
            SecretError::Base64
        );
        assert_eq!(
            SigningKey::from_secret("whsec_AAAA").unwrap_err(),
            SecretError::Length
        );
        assert!(SigningKey::from_secret(&SigningKey::generate_secret()).is_ok());
        assert_eq!(
            format!(
                "{:?}",
                SigningKey::from_secret(&SigningKey::generate_secret()).unwrap()
            ),
            "SigningKey(<redacted>)"
        );
    }

    #[test]
    fn body_signature_is_hex_hmac() {
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = key.sign_body_hex(b"hello");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), 7 + 64);
    }
}
