//! uploadhook: signed webhooks when a file has really landed in object storage.

pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod proto;
pub mod store;
