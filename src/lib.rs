//! callgate gates contact-centre calls behind an eID check: callers verify with BankID before they
//! reach an agent. See ARCHITECTURE.md for the map of modules, data flow and invariants.

pub mod api;
pub mod app;
pub mod audit;
pub mod backoff;
pub mod bench;
pub mod calls;
pub mod config;
pub mod demo;
pub mod dialog;
pub mod doctor;
pub mod durable;
pub mod idp;
pub mod outcome;
pub mod pbx;
pub mod pnr;
pub mod policy;
pub mod prompts;
pub mod secret;
pub mod state;
pub mod switchboard;
pub mod telemetry;
pub mod verify;
pub mod webhooks;
