//! Which routed prompts are kept for labelling (`[router.sample]`): an
//! opt-in share of real traffic that `tandem router label` can then run
//! through the deployed models, so the router learns the prompts it is
//! actually asked. Only prompts in which the detector found no personal
//! data are ever kept, and each text once.

use serde::{Deserialize, Serialize};

/// The `[router.sample]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Keep a sample of routed prompts (off unless asked for).
    #[serde(default)]
    pub enabled: bool,
    /// The share of routed prompts kept, 0..1.
    #[serde(default = "d_rate")]
    pub rate: f32,
    /// Prompts kept at most; once the file holds this many, no more are.
    #[serde(default = "d_max")]
    pub max_prompts: usize,
    /// Default: `$TANDEM_HOME/router/traffic.prompts.jsonl`.
    #[serde(default)]
    pub path: Option<std::path::PathBuf>,
}

fn d_rate() -> f32 {
    0.05
}
fn d_max() -> usize {
    10_000
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rate: d_rate(),
            max_prompts: d_max(),
            path: None,
        }
    }
}

impl SampleConfig {
    /// Whether the settings make sense, and if not, what to fix.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.rate) {
            return Err(format!(
                "[router.sample] rate = {}: it is a share of routed prompts, between 0 and 1",
                self.rate
            ));
        }
        if self.max_prompts == 0 {
            return Err("[router.sample] max_prompts must be at least 1".into());
        }
        Ok(())
    }

    /// Whether a routed prompt is kept, given a uniform `draw` in [0, 1):
    /// never one that may hold personal data (`private`: the detector found
    /// some, or could not run), nor once `kept` reached the cap; otherwise
    /// at the configured rate.
    pub fn keeps(&self, private: bool, kept: usize, draw: f32) -> bool {
        !private && kept < self.max_prompts && draw < self.rate.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_the_rate_never_private_and_up_to_the_cap() {
        let c = SampleConfig {
            rate: 0.25,
            max_prompts: 3,
            ..SampleConfig::default()
        };
        assert!(c.keeps(false, 0, 0.1));
        assert!(!c.keeps(false, 0, 0.25));
        assert!(!c.keeps(true, 0, 0.0), "personal data is never kept");
        assert!(!c.keeps(false, 3, 0.0), "the cap");
        let all = SampleConfig {
            rate: 2.0,
            ..SampleConfig::default()
        };
        assert!(all.keeps(false, 0, 0.999));
        let none = SampleConfig {
            rate: 0.0,
            ..SampleConfig::default()
        };
        assert!(!none.keeps(false, 0, 0.0));
        let toml: SampleConfig = toml::from_str("enabled = true\nrate = 0.5").unwrap();
        assert_eq!(
            (toml.enabled, toml.rate, toml.max_prompts),
            (true, 0.5, 10_000)
        );
        assert!(toml::from_str::<SampleConfig>("rat = 0.5").is_err());
        assert!(toml.check().is_ok());
        for bad in ["rate = 1.5", "rate = -0.1", "rate = nan", "max_prompts = 0"] {
            let c: SampleConfig = toml::from_str(bad).unwrap();
            assert!(c.check().is_err(), "{bad}");
        }
    }
}
