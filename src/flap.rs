//! The flapping rule (`presence.flap_threshold`, `presence.flap_half_life`).
//!
//! Owns [`FlapRule`]. The penalty itself is kept with each device's record and updated in
//! the transition step, in Redis (src/lua/common.lua, `flap_next`): every replica and every
//! script then agrees on it. Must not do I/O.

use std::time::Duration;

/// Route-flap damping as in RFC 2439: each transition adds 1 to a device's penalty, which
/// halves every `half_life`; a device is flapping from the transition whose penalty reaches
/// `threshold` until the penalty decays below half of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlapRule {
    pub threshold: u32,
    pub half_life: Duration,
}

impl Default for FlapRule {
    /// The contract's defaults: 4 and 5 minutes.
    fn default() -> Self {
        FlapRule {
            threshold: 4,
            half_life: Duration::from_secs(300),
        }
    }
}

impl FlapRule {
    /// The rule as the scripts take it: `threshold|half_life ms`.
    pub(crate) fn arg(&self) -> String {
        format!("{}|{}", self.threshold, self.half_life.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_get_the_threshold_and_the_half_life_in_ms() {
        let rule = FlapRule {
            threshold: 4,
            half_life: Duration::from_millis(2500),
        };
        assert_eq!(rule.arg(), "4|2500");
        assert_eq!(FlapRule::default().arg(), "4|300000");
    }
}
