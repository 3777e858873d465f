//! PBX adapters: Asterisk ARI and an in-process ARI simulator. They translate the wire into core inputs
//! and core commands into requests; they never decide routing.

pub mod ari;
pub mod asterisk;
pub mod routecheck;
pub mod sim;
