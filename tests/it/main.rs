//! One integration-test binary: the whole service against real components.

mod helpers;

mod flow;
mod ops;
mod rest;
mod scale;
