//! One integration-test binary: the whole service against real components.

mod helpers;

mod clients;
mod detect;
mod flow;
mod migrations;
mod ops;
mod processes;
mod redis_tls;
mod redrive;
mod rest;
mod scale;
mod security;
mod ssrf;
mod statements;
mod streams;
#[path = "../../src/pipeline/test_pki.rs"]
mod test_pki;
#[path = "../../src/store/test_statements.rs"]
mod test_statements;
mod tls;
