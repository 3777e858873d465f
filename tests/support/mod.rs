//! Support code shared by the integration tests (`tests/e2e.rs`, `tests/asterisk.rs`).

pub mod proxy;
