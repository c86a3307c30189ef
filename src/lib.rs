//! uploadhook: signed webhooks when a file has really landed in object storage.

pub mod config;
pub mod error;
pub mod proto;
