//! One integration-test binary: the whole service against real components.

mod helpers;

mod clients;
mod detect;
mod flow;
mod ops;
mod processes;
mod redrive;
mod rest;
mod scale;
mod security;
mod ssrf;
mod streams;
mod tls;
