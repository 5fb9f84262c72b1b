//! The state the router decides on, as plain data: the device (battery,
//! load, memory, temperature), the network (each upstream's reachability
//! and round trip, metered or not), and values set by hand that replace
//! readings while set. Reading these from the OS and probing upstreams is
//! the router's job; here they are only described.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The device as it is now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Percent, if the device has a battery.
    pub battery_pct: Option<f32>,
    /// Whether it is charging, if it has a battery.
    pub charging: Option<bool>,
    /// Cores busy with work outside Tandem.
    pub cpu_load: Option<f32>,
    /// Cores the machine has.
    pub cores: Option<usize>,
    /// Memory available to new work, MB.
    pub free_memory_mb: Option<u64>,
    /// The hottest thermal zone, °C.
    pub temperature_c: Option<f32>,
}

/// One upstream as seen from here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamState {
    /// The last probe (or request) got an answer.
    pub reachable: bool,
    /// The last probe's round trip, ms.
    pub rtt_ms: Option<f64>,
}

/// The network as seen from here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The connection costs by the byte.
    pub metered: bool,
    /// Each upstream by name.
    pub upstreams: HashMap<String, UpstreamState>,
}

/// Values set by hand; each replaces the measured one while set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Replaces [`DeviceState::battery_pct`].
    #[serde(default)]
    pub battery_pct: Option<f32>,
    /// Replaces [`DeviceState::charging`].
    #[serde(default)]
    pub charging: Option<bool>,
    /// Replaces [`DeviceState::cpu_load`].
    #[serde(default)]
    pub cpu_load: Option<f32>,
    /// Replaces [`DeviceState::free_memory_mb`].
    #[serde(default)]
    pub free_memory_mb: Option<u64>,
    /// Replaces [`DeviceState::temperature_c`].
    #[serde(default)]
    pub temperature_c: Option<f32>,
    /// Replaces [`NetworkState::metered`].
    #[serde(default)]
    pub metered: Option<bool>,
    /// Forces every upstream to look reachable (true) or not (false).
    #[serde(default)]
    pub cloud_reachable: Option<bool>,
}

impl Overrides {
    /// Applies the fields set in `other` (a JSON merge: absent fields keep
    /// their value; clearing is the holder's job).
    pub fn merge(&mut self, other: Overrides) {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            battery_pct,
            charging,
            cpu_load,
            free_memory_mb,
            temperature_c,
            metered,
            cloud_reachable
        );
    }
}

impl DeviceState {
    /// This state with `o`'s values in place of readings.
    pub fn with(mut self, o: &Overrides) -> DeviceState {
        if o.battery_pct.is_some() {
            self.battery_pct = o.battery_pct;
        }
        if o.charging.is_some() {
            self.charging = o.charging;
        }
        if o.cpu_load.is_some() {
            self.cpu_load = o.cpu_load;
        }
        if o.free_memory_mb.is_some() {
            self.free_memory_mb = o.free_memory_mb;
        }
        if o.temperature_c.is_some() {
            self.temperature_c = o.temperature_c;
        }
        self
    }
}

impl NetworkState {
    /// This state with `o`'s values in place of readings.
    pub fn with(mut self, o: &Overrides) -> NetworkState {
        if let Some(m) = o.metered {
            self.metered = m;
        }
        if let Some(r) = o.cloud_reachable {
            for u in self.upstreams.values_mut() {
                u.reachable = r;
            }
        }
        self
    }
}
