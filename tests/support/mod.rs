//! Support code shared by the integration tests (`tests/e2e.rs`, `tests/asterisk.rs`).

pub mod proxy;
// `webdriver.rs` (a small WebDriver client for headless Chromium) is declared by `tests/e2e.rs` alone,
// the one binary that drives a browser.
