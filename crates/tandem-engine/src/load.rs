//! How many cores other processes are using, so the engine can leave them
//! room: on a small machine, two inference threads fighting a busy core for
//! time run several times slower than one thread alone.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Shared, process-wide reading of other processes' CPU use.
#[derive(Debug)]
pub struct LoadMonitor {
    /// Cores busy with work outside this process, times 1000 (smoothed).
    other_milli: AtomicU32,
    cores: usize,
}

impl LoadMonitor {
    /// The process-wide monitor; the first call starts its sampling thread.
    pub fn global() -> Arc<LoadMonitor> {
        static MONITOR: OnceLock<Arc<LoadMonitor>> = OnceLock::new();
        MONITOR
            .get_or_init(|| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let m = Arc::new(LoadMonitor {
                    other_milli: AtomicU32::new(0),
                    cores,
                });
                let weak = Arc::downgrade(&m);
                let spawned = std::thread::Builder::new()
                    .name("tandem-load".into())
                    .spawn(move || sample_loop(weak));
                if let Err(e) = spawned {
                    tracing::warn!("cannot start the load monitor: {e}");
                }
                m
            })
            .clone()
    }

    /// Cores of this machine.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// Cores other processes kept busy recently.
    pub fn other_load(&self) -> f32 {
        self.other_milli.load(Ordering::Relaxed) as f32 / 1000.0
    }

    /// Threads for inference now: the cores others leave free, at least one.
    pub fn suggested_threads(&self) -> usize {
        threads_for(self.cores, self.other_load())
    }
}

/// A core counts as taken once others use more than half of it.
pub fn threads_for(cores: usize, other_load: f32) -> usize {
    let free = cores as f32 - other_load;
    (free.round() as usize).clamp(1, cores.max(1))
}

#[derive(Clone, Copy)]
struct Sample {
    busy: u64,
    total: u64,
    own: u64,
}

fn read_sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    let idle = v[3] + v[4];
    let total: u64 = v.iter().take(8).sum();
    let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields resume after its ')'.
    let rest = own_stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(Sample {
        busy: total - idle,
        total,
        own: utime + stime,
    })
}

fn sample_loop(monitor: std::sync::Weak<LoadMonitor>) {
    let Some(mut last) = read_sample() else {
        // Not Linux (or /proc hidden): assume the machine is ours.
        return;
    };
    let mut smoothed = 0.0f32;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Some(m) = monitor.upgrade() else { return };
        let Some(now) = read_sample() else { return };
        let total = now.total.saturating_sub(last.total);
        if total > 0 {
            let others = now
                .busy
                .saturating_sub(last.busy)
                .saturating_sub(now.own.saturating_sub(last.own));
            let cores_busy = others as f32 / total as f32 * m.cores as f32;
            // Half-life of about two seconds: a compile job shows up fast,
            // a one-off spike does not flip the thread count.
            smoothed = 0.75 * smoothed + 0.25 * cores_busy;
            m.other_milli
                .store((smoothed * 1000.0) as u32, Ordering::Relaxed);
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_choice() {
        assert_eq!(threads_for(2, 0.0), 2);
        assert_eq!(threads_for(2, 0.4), 2);
        assert_eq!(threads_for(2, 0.9), 1);
        assert_eq!(threads_for(2, 3.0), 1);
        assert_eq!(threads_for(8, 2.2), 6);
    }

    #[test]
    fn proc_sample_reads_on_linux() {
        if cfg!(target_os = "linux") {
            let s = read_sample().expect("/proc readable");
            assert!(s.total >= s.busy);
        }
    }
}
