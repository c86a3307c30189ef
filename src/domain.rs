//! Domain types: typed ids and the webhook state machine's states.
//!
//! Wire types (prost) are converted into these at the edge (`api/`); the
//! pipeline and the store never see a raw string id.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new, time-ordered id: the prefix and 32 hex digits of a
            /// UUIDv7, so that ids sort by creation time.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// Parses an id, checking its prefix and its 32 lower-case hex
            /// digits. The error says what is wrong, not which field.
            pub fn parse(s: &str) -> Result<Self, String> {
                let Some(hex) = s.strip_prefix($prefix) else {
                    return Err(format!("must start with `{}`", $prefix));
                };
                if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(format!("must be `{}` followed by 32 lower-case hex digits", $prefix));
                }
                Ok(Self(s.to_string()))
            }

            /// Wraps an id read back from the store, which wrote it valid.
            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A webhook: `wh_` + 32 hex.
    WebhookId,
    "wh_"
);
id_type!(
    /// A tenant: `tn_` + 32 hex.
    TenantId,
    "tn_"
);
id_type!(
    /// An API key's public id (not the secret): `key_` + 32 hex.
    ApiKeyId,
    "key_"
);

/// Where a webhook stands. Stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Pending,
    Verifying,
    Verified,
    Delivering,
    Retrying,
    Completed,
    Failed,
    Expired,
    DeadLetter,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Pending,
        Status::Verifying,
        Status::Verified,
        Status::Delivering,
        Status::Retrying,
        Status::Completed,
        Status::Failed,
        Status::Expired,
        Status::DeadLetter,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Verifying => "verifying",
            Status::Verified => "verified",
            Status::Delivering => "delivering",
            Status::Retrying => "retrying",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::DeadLetter => "dead_letter",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further transition happens by itself from a final status
    /// (Redeliver may start a new round from COMPLETED or DEAD_LETTER).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Completed
                | Status::Failed
                | Status::Expired
                | Status::DeadLetter
                | Status::Cancelled
        )
    }

    /// The statuses in which the pipeline owes the webhook more work; the
    /// queue is rebuilt from these at start-up.
    pub const QUEUED: [Status; 4] = [
        Status::Verifying,
        Status::Verified,
        Status::Delivering,
        Status::Retrying,
    ];

    pub fn to_proto(self) -> crate::proto::Status {
        use crate::proto::Status as P;
        match self {
            Status::Pending => P::Pending,
            Status::Verifying => P::Verifying,
            Status::Verified => P::Verified,
            Status::Delivering => P::Delivering,
            Status::Retrying => P::Retrying,
            Status::Completed => P::Completed,
            Status::Failed => P::Failed,
            Status::Expired => P::Expired,
            Status::DeadLetter => P::DeadLetter,
            Status::Cancelled => P::Cancelled,
        }
    }

    pub fn from_proto(p: crate::proto::Status) -> Option<Status> {
        use crate::proto::Status as P;
        Some(match p {
            P::Unspecified => return None,
            P::Pending => Status::Pending,
            P::Verifying => Status::Verifying,
            P::Verified => Status::Verified,
            P::Delivering => Status::Delivering,
            P::Retrying => Status::Retrying,
            P::Completed => Status::Completed,
            P::Failed => Status::Failed,
            P::Expired => Status::Expired,
            P::DeadLetter => Status::DeadLetter,
            P::Cancelled => Status::Cancelled,
        })
    }
}

/// How the server learns that an upload is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Auto,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Auto => "auto",
        }
    }

    pub fn parse(s: &str) -> Option<Trigger> {
        match s {
            "manual" => Some(Trigger::Manual),
            "auto" => Some(Trigger::Auto),
            _ => None,
        }
    }

    pub fn to_proto(self) -> crate::proto::Trigger {
        match self {
            Trigger::Manual => crate::proto::Trigger::Manual,
            Trigger::Auto => crate::proto::Trigger::Auto,
        }
    }
}

/// Event types written to the event log (and streamed by StreamEvents).
pub mod event_type {
    pub const CREATED: &str = "webhook.created";
    pub const CONFIRMED: &str = "upload.confirmed";
    /// AUTO: the server found the object by itself (a check or a storage
    /// event).
    pub const DETECTED: &str = "upload.detected";
    pub const VERIFIED: &str = "upload.verified";
    pub const VERIFY_RETRY: &str = "upload.not_found_yet";
    pub const VERIFICATION_FAILED: &str = "upload.verification_failed";
    pub const DELIVERING: &str = "delivery.started";
    pub const DELIVERED: &str = "delivery.succeeded";
    pub const RETRYING: &str = "delivery.retrying";
    pub const DEAD_LETTERED: &str = "delivery.dead_lettered";
    pub const EXPIRED: &str = "webhook.expired";
    pub const CANCELLED: &str = "webhook.cancelled";
    pub const REDELIVER: &str = "delivery.redriven";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_bad_input() {
        let id = WebhookId::generate();
        assert_eq!(id.as_str().len(), 3 + 32);
        assert_eq!(WebhookId::parse(id.as_str()).unwrap(), id);
        assert!(WebhookId::parse("wh_123").is_err());
        assert!(WebhookId::parse("tn_0123456789abcdef0123456789abcdef").is_err());
        assert!(WebhookId::parse("wh_0123456789ABCDEF0123456789abcdef").is_err());
        assert!(WebhookId::parse("wh_0123456789abcdef0123456789abcdef").is_ok());
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = WebhookId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = WebhookId::generate();
        assert!(a < b);
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(Status::from_proto(s.to_proto()), Some(s));
        }
    }
}
