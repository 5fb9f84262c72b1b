//! The live state the router decides on: the device (battery, load,
//! memory, temperature), the network (each upstream's reachability and
//! round trip, metered or not) and spending. Each value comes from the OS
//! or a probe, and each can be overridden — by tests, by a demo, or by an
//! app that knows better (a phone's OS knows when the link is metered).

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use tandem_policy::signals::{DeviceState, NetworkState, Overrides, UpstreamState};

/// Reads the device from the operating system (Linux `/sys` and `/proc`):
/// memory, temperature, battery. CPU load is the caller's to add (the
/// engine measures what other processes use; see [`SignalHub::with_reader`]).
pub fn read_device() -> DeviceState {
    let mut d = DeviceState {
        cores: std::thread::available_parallelism().ok().map(|n| n.get()),
        free_memory_mb: read_free_memory_mb(),
        temperature_c: read_temperature(),
        ..DeviceState::default()
    };
    if let Some((pct, charging)) = read_battery() {
        d.battery_pct = Some(pct);
        d.charging = Some(charging);
    }
    d
}

fn read_free_memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb / 1024)
}

fn read_temperature() -> Option<f32> {
    let zones = std::fs::read_dir("/sys/class/thermal").ok()?;
    zones
        .filter_map(Result::ok)
        .filter(|z| z.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|z| std::fs::read_to_string(z.path().join("temp")).ok())
        .filter_map(|t| t.trim().parse::<f32>().ok())
        .map(|milli| milli / 1000.0)
        .fold(None, |m: Option<f32>, t| Some(m.map_or(t, |m| m.max(t))))
}

fn read_battery() -> Option<(f32, bool)> {
    let supplies = std::fs::read_dir("/sys/class/power_supply").ok()?;
    for s in supplies.filter_map(Result::ok) {
        let p = s.path();
        let kind = std::fs::read_to_string(p.join("type")).unwrap_or_default();
        if kind.trim() != "Battery" {
            continue;
        }
        let pct = std::fs::read_to_string(p.join("capacity"))
            .ok()?
            .trim()
            .parse::<f32>()
            .ok()?;
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        let charging = matches!(status.trim(), "Charging" | "Full");
        return Some((pct, charging));
    }
    None
}

/// A probe of one upstream: `Ok(rtt)` when it answered.
pub type Probe =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Duration, String>> + Send + Sync>;

/// Reads the device now (blocking; called off the async workers).
pub type DeviceReader = Arc<dyn Fn() -> DeviceState + Send + Sync>;

#[derive(Default)]
struct HubState {
    device: DeviceState,
    network: NetworkState,
    overrides: Overrides,
    /// Failed probes in a row, per upstream.
    probe_failures: std::collections::HashMap<String, u32>,
}

/// Probes that must fail in a row before an upstream counts as
/// unreachable: one lost probe is a blip, not an outage (Envoy's
/// `unhealthy_threshold` works the same way).
pub const PROBE_FAILURES_UNREACHABLE: u32 = 2;

/// Holds the latest readings; a background task refreshes them.
#[derive(Clone)]
pub struct SignalHub {
    state: Arc<Mutex<HubState>>,
    reader: DeviceReader,
}

impl std::fmt::Debug for SignalHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalHub").finish_non_exhaustive()
    }
}

impl Default for SignalHub {
    fn default() -> Self {
        Self::new()
    }
}

impl SignalHub {
    /// A hub with the device read once; [`spawn_refresh`](Self::spawn_refresh)
    /// keeps it current.
    pub fn new() -> Self {
        Self::with_reader(Arc::new(read_device))
    }

    /// A hub whose device readings come from `reader`.
    pub fn with_reader(reader: DeviceReader) -> Self {
        let hub = SignalHub {
            state: Arc::new(Mutex::new(HubState::default())),
            reader,
        };
        hub.lock().device = (hub.reader)();
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device with overrides applied.
    pub fn device(&self) -> DeviceState {
        let s = self.lock();
        s.device.clone().with(&s.overrides)
    }

    /// The network with overrides applied.
    pub fn network(&self) -> NetworkState {
        let s = self.lock();
        s.network.clone().with(&s.overrides)
    }

    /// Whether `upstream` is reachable; unknown upstreams (not probed yet)
    /// count as reachable until a probe says otherwise.
    pub fn reachable(&self, upstream: &str) -> bool {
        let s = self.lock();
        if let Some(r) = s.overrides.cloud_reachable {
            return r;
        }
        s.network
            .upstreams
            .get(upstream)
            .is_none_or(|u| u.reachable)
    }

    /// The values set by hand.
    pub fn overrides(&self) -> Overrides {
        self.lock().overrides.clone()
    }

    /// Sets values by hand (merged with those set).
    pub fn set_overrides(&self, o: Overrides) {
        self.lock().overrides.merge(o);
    }

    /// Back to measured values.
    pub fn clear_overrides(&self) {
        self.lock().overrides = Overrides::default();
    }

    /// Records a probe result (also used when a request to the upstream
    /// fails or succeeds, which is fresher than the last probe).
    pub fn set_upstream(&self, name: &str, reachable: bool, rtt: Option<Duration>) {
        let mut s = self.lock();
        let u = s.network.upstreams.entry(name.to_owned()).or_default();
        u.reachable = reachable;
        if let Some(r) = rtt {
            u.rtt_ms = Some(r.as_secs_f64() * 1000.0);
        }
    }

    /// Records a probe: reachable again at the first success, unreachable
    /// after [`PROBE_FAILURES_UNREACHABLE`] failures in a row.
    pub fn record_probe(&self, name: &str, result: Result<Duration, String>) {
        let mut s = self.lock();
        let failures = s.probe_failures.entry(name.to_owned()).or_default();
        match result {
            Ok(rtt) => {
                *failures = 0;
                drop(s);
                self.set_upstream(name, true, Some(rtt));
            }
            Err(e) => {
                *failures += 1;
                let down = *failures >= PROBE_FAILURES_UNREACHABLE;
                tracing::debug!(upstream = %name, failures = *failures, "probe failed: {e}");
                drop(s);
                if down {
                    self.set_upstream(name, false, None);
                }
            }
        }
    }

    /// A real request got an answer from `name`: fresher evidence than any
    /// probe that it is reachable.
    pub fn record_answer(&self, name: &str) {
        let mut s = self.lock();
        s.probe_failures.insert(name.to_owned(), 0);
        drop(s);
        self.set_upstream(name, true, None);
    }

    /// Whether the link is metered (the OS rarely says).
    pub fn set_metered(&self, metered: bool) {
        self.lock().network.metered = metered;
    }

    /// Refreshes the device every `device_every` and probes each upstream
    /// every `probe_every`, until the hub is dropped everywhere else.
    pub fn spawn_refresh(
        &self,
        probes: Vec<(String, Probe)>,
        device_every: Duration,
        probe_every: Duration,
    ) {
        let weak = Arc::downgrade(&self.state);
        let reader = self.reader.clone();
        tokio::spawn(async move {
            let mut next_probe = tokio::time::Instant::now();
            loop {
                let Some(state) = weak.upgrade() else { return };
                let hub = SignalHub {
                    state,
                    reader: reader.clone(),
                };
                let read = reader.clone();
                let device = tokio::task::spawn_blocking(move || read())
                    .await
                    .unwrap_or_default();
                hub.lock().device = device;
                if tokio::time::Instant::now() >= next_probe {
                    for (name, probe) in &probes {
                        let result = probe().await.map_err(|e| e.to_string());
                        hub.record_probe(name, result);
                    }
                    next_probe = tokio::time::Instant::now() + probe_every;
                }
                drop(hub);
                tokio::time::sleep(device_every.min(probe_every)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_readings_until_cleared() {
        let hub = SignalHub::new();
        hub.set_upstream("cloud", true, Some(Duration::from_millis(20)));
        hub.set_overrides(Overrides {
            battery_pct: Some(10.0),
            charging: Some(false),
            ..Overrides::default()
        });
        hub.set_overrides(Overrides {
            cloud_reachable: Some(false),
            ..Overrides::default()
        });
        assert_eq!(hub.device().battery_pct, Some(10.0));
        assert!(!hub.reachable("cloud"));
        assert!(!hub.network().upstreams["cloud"].reachable);
        hub.clear_overrides();
        assert!(hub.reachable("cloud"));
        assert_eq!(hub.network().upstreams["cloud"].rtt_ms, Some(20.0));
    }

    #[test]
    fn one_lost_probe_is_a_blip_and_real_answers_count() {
        let hub = SignalHub::new();
        let ms = Duration::from_millis;
        hub.record_probe("cloud", Ok(ms(5)));
        hub.record_probe("cloud", Err("timeout".into()));
        assert!(hub.reachable("cloud"), "one failure");
        hub.record_probe("cloud", Ok(ms(5)));
        hub.record_probe("cloud", Err("timeout".into()));
        assert!(hub.reachable("cloud"), "the count restarts after a success");
        hub.record_probe("cloud", Err("timeout".into()));
        assert!(!hub.reachable("cloud"), "two in a row");
        hub.record_answer("cloud");
        assert!(hub.reachable("cloud"), "a real answer");
        hub.record_probe("cloud", Err("timeout".into()));
        assert!(hub.reachable("cloud"), "the answer restarted the count");
    }

    #[test]
    fn os_readings_do_not_fail() {
        let d = read_device();
        assert!(d.cores.unwrap_or(0) >= 1);
        if cfg!(target_os = "linux") {
            assert!(d.free_memory_mb.unwrap_or(0) > 0);
        }
    }
}
