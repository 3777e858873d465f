//! `callgate demo`: simulated Asterisk + simulated BankID + callgate in one process.
pub async fn run(_format: crate::telemetry::LogFormat) -> anyhow::Result<bool> {
    anyhow::bail!("the demo needs the ARI simulator")
}
