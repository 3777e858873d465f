//! Delays between reconnects and retries.

use std::time::Duration;

/// Half the delay fixed, half random ("equal jitter"), so that instances reconnecting or retrying
/// at the same moment spread out.
pub fn jittered(base: Duration) -> Duration {
    let half = base / 2;
    let rest = base.saturating_sub(half);
    let nanos = u64::try_from(rest.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn between_half_and_all_of_the_delay() {
        for ms in [0u64, 1, 7, 1000, 60_000] {
            let base = Duration::from_millis(ms);
            for _ in 0..100 {
                let d = jittered(base);
                assert!(d >= base / 2 && d <= base, "{d:?} for {base:?}");
            }
        }
    }
}
