//! Event fan-out: wakes readers of the event log (StreamEvents).
//!
//! The stored events are the truth; a bus only tells subscribers that an
//! event was committed. The embedded deployment uses an in-process
//! broadcast; a scaled-out deployment puts Redis pub/sub or PostgreSQL
//! LISTEN/NOTIFY behind the same trait.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::domain::{Status, TenantId, WebhookId};

/// One committed step in a webhook's life.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Monotonic per deployment (the database sequence): the resume cursor.
    pub id: i64,
    pub tenant_id: TenantId,
    pub webhook_id: WebhookId,
    pub kind: String,
    pub status: Status,
    pub occurred_at: DateTime<Utc>,
}

pub trait EventBus: Send + Sync + 'static {
    /// Called after the event's transaction committed.
    fn publish(&self, event: Event);
    /// Receives every event published from now on. A lagging receiver
    /// misses events (`RecvError::Lagged`) and must re-read the store.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>>;
}

/// In-process fan-out over a bounded broadcast channel.
pub struct LocalEventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl LocalEventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self { tx }
    }
}

impl EventBus for LocalEventBus {
    fn publish(&self, event: Event) {
        // No subscriber is not an error: the event is stored either way.
        let _ = self.tx.send(Arc::new(event));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
