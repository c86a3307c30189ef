//! The API: the plain service, its gRPC adapter, and the REST gateway
//! generated from the `google.api.http` annotations.
//!
//! Architecture Invariant: only `api/` knows tonic and HTTP.

pub mod admission;
pub mod audit;
pub mod gateway;
pub mod grpc;
pub mod keycache;
pub mod ratelimit;
pub mod service;
pub mod storage_events;
pub mod validate;
