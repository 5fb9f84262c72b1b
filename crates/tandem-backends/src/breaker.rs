//! A circuit breaker per upstream: after repeated failures the upstream is
//! skipped for a cool-down instead of making every request wait for it to
//! fail again; then one trial request decides whether it is back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `trial`: when the one request let through to test the upstream
    /// started, if one is in flight.
    HalfOpen {
        trial: Option<Instant>,
    },
}

/// One upstream's circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    trial_expiry: Duration,
}

use tandem_api::BreakerState;

/// A request let through: a trial ([`Pass::Trial`]) must end with
/// [`CircuitBreaker::success`] or [`CircuitBreaker::failure`]; a trial
/// whose request is dropped first (the client went away) must be given
/// back with [`CircuitBreaker::abandon`], or the breaker waits for the
/// trial's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The breaker is closed.
    Normal,
    /// The one request that decides whether the upstream is back.
    Trial,
}

impl CircuitBreaker {
    /// Opens after `threshold` failures in a row, for `cooldown`. A trial
    /// with no verdict after `trial_expiry` no longer blocks the next.
    pub fn new(threshold: u32, cooldown: Duration, trial_expiry: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            trial_expiry,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn trial_open(&self, trial: Option<Instant>) -> bool {
        trial.is_some_and(|t| t.elapsed() < self.trial_expiry)
    }

    /// May a request go to the upstream now? In half-open state only one
    /// trial request is let through at a time.
    pub fn admit(&self) -> Option<Pass> {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Some(Pass::Normal),
            State::Open { until } if Instant::now() < until => None,
            State::HalfOpen { trial } if self.trial_open(trial) => None,
            State::Open { .. } | State::HalfOpen { .. } => {
                *s = State::HalfOpen {
                    trial: Some(Instant::now()),
                };
                Some(Pass::Trial)
            }
        }
    }

    /// Would [`admit`](Self::admit) let a request through, without taking
    /// the half-open trial?
    pub fn is_available(&self) -> bool {
        match *self.lock() {
            State::Closed { .. } => true,
            State::Open { until } => Instant::now() >= until,
            State::HalfOpen { trial } => !self.trial_open(trial),
        }
    }

    /// What it says now.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// A request succeeded: closed again.
    pub fn success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// A request failed.
    pub fn failure(&self) {
        let mut s = self.lock();
        *s = match *s {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.cooldown,
            },
        };
    }

    /// The trial's request ended without a verdict: the next request may
    /// try. Does nothing once a verdict was given.
    pub fn abandon(&self) {
        let mut s = self.lock();
        if let State::HalfOpen { trial: Some(_) } = *s {
            *s = State::HalfOpen { trial: None };
        }
    }
}

/// Gives a trial back when dropped: hold one for as long as the trial's
/// request (or its answer's stream) lives.
#[derive(Debug)]
pub struct TrialGuard<F: Fn()>(Option<F>);

impl<F: Fn()> TrialGuard<F> {
    /// Calls `abandon` on drop when `pass` is a trial.
    pub fn new(pass: Pass, abandon: F) -> Self {
        Self((pass == Pass::Trial).then_some(abandon))
    }
}

impl<F: Fn()> Drop for TrialGuard<F> {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_half_opens_after_cooldown() {
        let b = CircuitBreaker::new(2, Duration::from_millis(30), Duration::from_secs(60));
        b.failure();
        assert_eq!(b.admit(), Some(Pass::Normal));
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Some(Pass::Trial));
        assert_eq!(b.admit(), None, "only one trial at a time");
        b.failure();
        assert_eq!(b.admit(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Some(Pass::Trial));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_some() && b.admit().is_some());
    }

    #[test]
    fn an_abandoned_trial_is_given_back_and_a_forgotten_one_expires() {
        let b = CircuitBreaker::new(1, Duration::ZERO, Duration::from_millis(50));
        b.failure();
        let pass = b.admit().unwrap();
        assert_eq!(pass, Pass::Trial);
        {
            let _guard = TrialGuard::new(pass, || b.abandon());
            assert!(!b.is_available());
        }
        assert_eq!(b.admit(), Some(Pass::Trial), "given back on drop");
        // Nobody gives this one back: it expires.
        assert_eq!(b.admit(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Some(Pass::Trial));
        b.success();
        // A guard after the verdict changes nothing.
        drop(TrialGuard::new(Pass::Trial, || b.abandon()));
        assert_eq!(b.state(), BreakerState::Closed);
        drop(TrialGuard::new(Pass::Normal, || panic!("not a trial")));
    }
}
