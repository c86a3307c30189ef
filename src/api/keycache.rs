//! A short cache of API keys that authenticated (`api.key_cache_ttl`), so
//! that a busy caller's Create and Confirm do not each read its key from
//! the database.
//!
//! The trade: a key revoked in the database keeps working in each API
//! process until its cached entry is older than the TTL (5 s by default;
//! 0 reads the key on every call). A key's own `expires_at` is exact:
//! an entry never outlives the key.
//!
//! Entries are keyed by the SHA-256 of the key, never the key itself, and
//! only keys that authenticated are cached, so a caller cannot fill the
//! cache with guesses. Memory is bounded by `MAX_ENTRIES`.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};

use crate::{domain::TenantId, store::KeyGrant};

/// Keys held at once; beyond it, stale entries are dropped, then all.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone)]
struct Entry {
    tenant: TenantId,
    /// When the entry stops being used: the TTL, or the key's expiry if
    /// sooner.
    until: DateTime<Utc>,
}

#[derive(Debug)]
pub struct KeyCache {
    ttl: chrono::Duration,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

impl KeyCache {
    /// None when `ttl` is zero (no cache).
    pub fn new(ttl: Duration) -> Option<Self> {
        if ttl.is_zero() {
            return None;
        }
        Some(Self {
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// The tenant of a key that authenticated less than the TTL ago and
    /// has not expired since.
    pub fn get(&self, key_hash: &[u8; 32], now: DateTime<Utc>) -> Option<TenantId> {
        let entries = self.entries.lock().expect("key cache lock");
        entries
            .get(key_hash)
            .filter(|e| now < e.until)
            .map(|e| e.tenant.clone())
    }

    /// Remembers a key that just authenticated.
    pub fn put(&self, key_hash: [u8; 32], grant: &KeyGrant, now: DateTime<Utc>) {
        let until = now
            .checked_add_signed(self.ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let until = grant.expires_at.map_or(until, |e| e.min(until));
        if until <= now {
            return;
        }
        let mut entries = self.entries.lock().expect("key cache lock");
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key_hash) {
            entries.retain(|_, e| now < e.until);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            key_hash,
            Entry {
                tenant: grant.tenant.clone(),
                until,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(tenant: &str, expires_at: Option<DateTime<Utc>>) -> KeyGrant {
        KeyGrant {
            tenant: TenantId::from_trusted(tenant.to_string()),
            expires_at,
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn zero_ttl_is_no_cache() {
        assert!(KeyCache::new(Duration::ZERO).is_none());
    }

    #[test]
    fn an_entry_is_used_for_the_ttl_then_not() {
        let cache = KeyCache::new(Duration::from_secs(5)).unwrap();
        let now = t0();
        assert_eq!(cache.get(&[1; 32], now), None);
        cache.put([1; 32], &grant("a", None), now);
        assert_eq!(
            cache.get(&[1; 32], now + chrono::Duration::milliseconds(4999)),
            Some(TenantId::from_trusted("a".into()))
        );
        assert_eq!(
            cache.get(&[1; 32], now + chrono::Duration::seconds(5)),
            None
        );
        assert_eq!(cache.get(&[2; 32], now), None, "another key");
    }

    #[test]
    fn an_entry_never_outlives_its_key() {
        let cache = KeyCache::new(Duration::from_secs(60)).unwrap();
        let now = t0();
        let expires = now + chrono::Duration::seconds(2);
        cache.put([1; 32], &grant("a", Some(expires)), now);
        assert!(
            cache
                .get(&[1; 32], expires - chrono::Duration::milliseconds(1))
                .is_some()
        );
        assert_eq!(cache.get(&[1; 32], expires), None);
        // A key already expired is not cached at all.
        cache.put([2; 32], &grant("a", Some(now)), now);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn memory_is_bounded() {
        let cache = KeyCache::new(Duration::from_secs(5)).unwrap();
        let now = t0();
        for i in 0..MAX_ENTRIES as u32 {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            cache.put(h, &grant("a", None), now);
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        // Stale entries go first ...
        let later = now + chrono::Duration::seconds(6);
        cache.put([0xff; 32], &grant("b", None), later);
        assert_eq!(cache.len(), 1);
        // ... and when none is stale, all go.
        for i in 1..MAX_ENTRIES as u32 {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            cache.put(h, &grant("a", None), later);
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        cache.put([0xee; 32], &grant("c", None), later);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&[0xee; 32], later).is_some());
    }
}
