//! One integration-test binary: the whole service against real components.

mod helpers;

mod clients;
mod flow;
mod ops;
mod processes;
mod rest;
mod scale;
mod ssrf;
mod streams;
