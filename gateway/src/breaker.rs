//! Per-backend circuit breaker: closed -> open after `failureThreshold` consecutive
//! failures (5xx, timeouts, connection errors; never 429 or other 4xx) -> half-open after
//! `openSeconds`, when exactly one probe is let through -> closed on its success, open
//! again on its failure.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What an attempt's outcome means for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx (or any answer proving the backend works, such as a 400).
    Success,
    /// 5xx, timeout, connection error.
    Failure,
    /// 429: the backend is alive but refused us; neither counts.
    Neutral,
}

/// The externally visible state (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// No traffic until the open period ends.
    Open,
    /// One probe in flight.
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_since: Instant },
}

/// One backend's breaker.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    threshold: u32,
    open_for: Duration,
    state: State,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                threshold: threshold.max(1),
                open_for,
                state: State::Closed { failures: 0 },
            }),
        }
    }

    /// Applies new settings (on config reload), keeping the state.
    pub fn configure(&self, threshold: u32, open_for: Duration) {
        let mut inner = self.inner.lock();
        inner.threshold = threshold.max(1);
        inner.open_for = open_for;
    }

    /// Whether a request could be let through now (does not take the probe).
    pub fn available(&self, now: Instant) -> bool {
        let inner = self.inner.lock();
        match inner.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            // A probe lost without an answer (client gone) frees the slot after a while.
            State::HalfOpen { probe_since } => now >= probe_since + inner.open_for,
        }
    }

    /// Lets a request through if possible; when the open period is over this takes the
    /// single half-open probe.
    pub fn acquire(&self, now: Instant) -> bool {
        let mut inner = self.inner.lock();
        let open_for = inner.open_for;
        match inner.state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                inner.state = State::HalfOpen { probe_since: now };
                true
            }
            State::HalfOpen { probe_since } if now >= probe_since + open_for => {
                inner.state = State::HalfOpen { probe_since: now };
                true
            }
            _ => false,
        }
    }

    /// Records an attempt's outcome; returns the state after it.
    pub fn record(&self, outcome: Outcome, now: Instant) -> BreakerState {
        self.record_transition(outcome, now).1
    }

    /// Records an attempt's outcome; returns the states before and after it (for logging
    /// when the breaker opens or closes, decided under the same lock).
    pub fn record_transition(
        &self,
        outcome: Outcome,
        now: Instant,
    ) -> (BreakerState, BreakerState) {
        let mut inner = self.inner.lock();
        let before = state_of(&inner.state);
        let open_for = inner.open_for;
        let threshold = inner.threshold;
        inner.state = match (&inner.state, outcome) {
            (_, Outcome::Success) => State::Closed { failures: 0 },
            (State::Closed { failures }, Outcome::Failure) => {
                if failures + 1 >= threshold {
                    State::Open {
                        until: now + open_for,
                    }
                } else {
                    State::Closed {
                        failures: failures + 1,
                    }
                }
            }
            (State::HalfOpen { .. }, Outcome::Failure) => State::Open {
                until: now + open_for,
            },
            (State::Open { until }, Outcome::Failure) => State::Open { until: *until },
            // A 429 during the probe proves the backend answers.
            (State::HalfOpen { .. }, Outcome::Neutral) => State::Closed { failures: 0 },
            (State::Closed { failures }, Outcome::Neutral) => State::Closed {
                failures: *failures,
            },
            (State::Open { until }, Outcome::Neutral) => State::Open { until: *until },
        };
        (before, state_of(&inner.state))
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        state_of(&self.inner.lock().state)
    }
}

fn state_of(s: &State) -> BreakerState {
    match s {
        State::Closed { .. } => BreakerState::Closed,
        State::Open { .. } => BreakerState::Open,
        State::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_one_probe() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(b.acquire(t0));
            assert_eq!(b.record(Outcome::Failure, t0), BreakerState::Closed);
        }
        assert!(b.acquire(t0));
        assert_eq!(b.record(Outcome::Failure, t0), BreakerState::Open);
        assert!(!b.available(t0 + Duration::from_secs(9)));
        assert!(!b.acquire(t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert!(b.available(t1));
        assert!(b.acquire(t1), "the probe");
        assert!(!b.acquire(t1), "only one probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.record(Outcome::Failure, t1), BreakerState::Open);
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.acquire(t2));
        assert_eq!(b.record(Outcome::Success, t2), BreakerState::Closed);
        assert!(b.acquire(t2));
    }

    #[test]
    fn rate_limits_do_not_count_and_success_resets() {
        let b = Breaker::new(2, Duration::from_secs(10));
        let t = Instant::now();
        b.record(Outcome::Failure, t);
        for _ in 0..10 {
            b.record(Outcome::Neutral, t);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(Outcome::Success, t);
        b.record(Outcome::Failure, t);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(Outcome::Failure, t);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn lost_probe_is_released() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t = Instant::now();
        b.record(Outcome::Failure, t);
        let t1 = t + Duration::from_secs(5);
        assert!(b.acquire(t1));
        assert!(!b.acquire(t1 + Duration::from_secs(1)));
        assert!(b.acquire(t1 + Duration::from_secs(5)));
    }
}
