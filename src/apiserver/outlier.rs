//! Passive outlier detection: an instance's health judged from the live traffic the apiserver
//! sends it, on top of the heartbeats that decide membership.
//!
//! Each instance (one model on one worker) carries an [`Outlier`]: `--outlier_consecutive_failures`
//! failures in a row (a connect error, a 5xx, no response headers within the first-byte
//! timeout, a stream that breaks or stalls) *eject* it for a backoff that doubles with every
//! ejection in a row (`--outlier_base_ejection_secs`, capped at `--outlier_max_ejection_secs`).
//! An overloaded answer (503/429 with `Retry-After`), a slow answer within the request timeout
//! and a client that goes away count neither way; any answer from the worker (a 2xx, or its
//! 400/413 verdict on the request) is a success and resets the count. An ejected instance is
//! skipped by the routing policy unless nothing else is left ([`super::policy`]); once its
//! backoff is over it takes exactly one *trial* request (the claim is held by that request's
//! [`super::policy::InFlight`] and given back if it ends without a verdict): success brings it
//! back with the backoff reset, failure ejects it again for twice as long. A discovery refresh
//! that shows the instance registering again (a restarted worker) forgets all of it.
//!
//! The state machine takes the time as an argument (milliseconds on [`now_ms`]'s clock) so
//! its tests run on a fake clock; the hot paths (a success with no failure recorded, the
//! policy's check of an instance that is not ejected) are one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The outlier flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Failures in a row that eject an instance; 0 turns outlier detection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; each ejection in a row doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        }
    }
}

impl Settings {
    /// The length of the ejection that follows `streak` ejections in a row.
    pub fn backoff(&self, streak: u32) -> Duration {
        let factor = 1u32.checked_shl(streak.min(31)).unwrap_or(u32::MAX);
        self.base_ejection
            .checked_mul(factor)
            .unwrap_or(self.max_ejection)
            .min(self.max_ejection)
    }
}

/// Milliseconds on the process's monotonic outlier clock (never 0).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking traffic.
    #[default]
    In,
    /// Ejected until `until` (ms); from then on a trial is due.
    Out { until: u64 },
    /// Its trial request (`id`) is in flight.
    Trial { id: u64 },
}

#[derive(Debug, Default)]
struct State {
    phase: Phase,
    /// Failures in a row while in.
    consecutive: u32,
    /// Ejections in a row (the backoff's exponent); reset by a success after a backoff.
    streak: u32,
    /// Ejections since the instance was first seen.
    total: u64,
    next_trial: u64,
}

/// One instance's outlier state (see the module docs).
#[derive(Debug, Default)]
pub struct Outlier {
    /// `phase != In` (lock-free check for the policy and for successes).
    out: AtomicBool,
    /// `consecutive != 0` (lock-free check for successes).
    failing: AtomicBool,
    state: Mutex<State>,
}

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing worth a log line.
    None,
    /// The instance is ejected for this long (`nth` ejection in a row).
    Ejected { backoff: Duration, nth: u32 },
    /// The instance took traffic again after an ejection.
    Restored,
}

/// What status and metrics show of an ejected instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Time left of the backoff (zero: a trial is due or in flight).
    pub remaining: Duration,
    /// Whether its trial request is in flight.
    pub trial: bool,
    /// Ejections in a row.
    pub streak: u32,
    /// Ejections since the instance was first seen.
    pub total: u64,
}

impl Outlier {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync(&self, s: &State) {
        self.out.store(s.phase != Phase::In, Ordering::Relaxed);
        self.failing.store(s.consecutive != 0, Ordering::Relaxed);
    }

    /// May the policy choose it as a normal candidate at `now`? (In, or its backoff is over
    /// and no trial is in flight.)
    pub fn admits(&self, now: u64) -> bool {
        if !self.out.load(Ordering::Relaxed) {
            return true;
        }
        match self.lock().phase {
            Phase::In => true,
            Phase::Out { until } => now >= until,
            Phase::Trial { .. } => false,
        }
    }

    /// Claims the trial when its backoff is over and none is in flight (a request starts on
    /// the instance): the id to give back with [`Outlier::release`].
    pub fn claim(&self, now: u64) -> Option<u64> {
        if !self.out.load(Ordering::Relaxed) {
            return None;
        }
        let mut s = self.lock();
        match s.phase {
            Phase::Out { until } if now >= until => {
                s.next_trial += 1;
                let id = s.next_trial;
                s.phase = Phase::Trial { id };
                Some(id)
            }
            _ => None,
        }
    }

    /// The trial `id` ended without a verdict (overloaded, too slow, the client went away):
    /// the next request may try.
    pub fn release(&self, id: u64) {
        let mut s = self.lock();
        if s.phase == (Phase::Trial { id }) {
            s.phase = Phase::Out { until: 0 };
            self.sync(&s);
        }
    }

    /// The worker answered.
    pub fn success(&self, now: u64) -> Change {
        if !self.out.load(Ordering::Relaxed) && !self.failing.load(Ordering::Relaxed) {
            return Change::None;
        }
        let mut s = self.lock();
        let change = match s.phase {
            Phase::In => Change::None,
            // A request that started before the ejection: only a trial decides.
            Phase::Out { until } if now < until => return Change::None,
            Phase::Out { .. } | Phase::Trial { .. } => {
                s.phase = Phase::In;
                s.streak = 0;
                Change::Restored
            }
        };
        s.consecutive = 0;
        self.sync(&s);
        change
    }

    /// The instance failed a request (see the module docs for what counts).
    pub fn failure(&self, now: u64, settings: &Settings) -> Change {
        if settings.consecutive_failures == 0 {
            return Change::None;
        }
        let mut s = self.lock();
        let eject = match s.phase {
            Phase::In => {
                s.consecutive += 1;
                s.consecutive >= settings.consecutive_failures
            }
            // A request that started before the ejection.
            Phase::Out { until } if now < until => false,
            // The trial (or a request after the backoff) failed.
            Phase::Out { .. } | Phase::Trial { .. } => true,
        };
        let change = if eject {
            let backoff = settings.backoff(s.streak);
            s.streak = s.streak.saturating_add(1);
            s.total += 1;
            s.consecutive = 0;
            s.phase = Phase::Out {
                until: now + backoff.as_millis() as u64,
            };
            Change::Ejected {
                backoff,
                nth: s.streak,
            }
        } else {
            Change::None
        };
        self.sync(&s);
        change
    }

    /// Forgets everything (the instance registered again).
    pub fn reset(&self) {
        let mut s = self.lock();
        let total = s.total;
        *s = State {
            total,
            ..State::default()
        };
        self.sync(&s);
    }

    /// The ejection in force at `now`, if any.
    pub fn ejection(&self, now: u64) -> Option<Ejection> {
        if !self.out.load(Ordering::Relaxed) {
            return None;
        }
        let s = self.lock();
        let (remaining, trial) = match s.phase {
            Phase::In => return None,
            Phase::Out { until } => (Duration::from_millis(until.saturating_sub(now)), false),
            Phase::Trial { .. } => (Duration::ZERO, true),
        };
        Some(Ejection {
            remaining,
            trial,
            streak: s.streak,
            total: s.total,
        })
    }

    /// Ejections since the instance was first seen.
    #[cfg(test)]
    fn total(&self) -> u64 {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(5),
        max_ejection: Duration::from_secs(300),
    };

    fn ejected(o: &Outlier, now: u64) -> Option<Duration> {
        o.ejection(now).map(|e| e.remaining)
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let secs: Vec<u64> = (0..9).map(|n| S.backoff(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(S.backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let o = Outlier::default();
        assert_eq!(o.failure(1, &S), Change::None);
        assert_eq!(o.failure(2, &S), Change::None);
        // A success in between: the count starts again.
        assert_eq!(o.success(3), Change::None);
        assert_eq!(o.failure(4, &S), Change::None);
        assert_eq!(o.failure(5, &S), Change::None);
        assert!(o.admits(5));
        assert_eq!(
            o.failure(1000, &S),
            Change::Ejected {
                backoff: Duration::from_secs(5),
                nth: 1
            }
        );
        assert!(!o.admits(1000));
        assert_eq!(ejected(&o, 2000), Some(Duration::from_secs(4)));
        // Stragglers that started before the ejection change nothing.
        assert_eq!(o.failure(2000, &S), Change::None);
        assert_eq!(o.success(2000), Change::None);
        assert_eq!(ejected(&o, 2000), Some(Duration::from_secs(4)));
        assert_eq!(o.claim(5999), None, "no trial before the backoff is over");
    }

    #[test]
    fn exactly_one_trial_then_back_or_longer() {
        let o = Outlier::default();
        for t in 0..3 {
            o.failure(t, &S);
        }
        // Backoff over: the policy admits it, one request claims the trial.
        assert!(o.admits(5002));
        let id = o.claim(5002).expect("the trial");
        assert!(!o.admits(5003), "one trial at a time");
        assert_eq!(o.claim(5003), None);
        // The trial fails: out again for twice as long.
        assert_eq!(
            o.failure(5004, &S),
            Change::Ejected {
                backoff: Duration::from_secs(10),
                nth: 2
            }
        );
        o.release(id); // its guard goes after the verdict: no effect
        assert!(!o.admits(15003));
        assert!(o.admits(15004));
        // A trial that ends without a verdict gives the claim back.
        let id = o.claim(15004).unwrap();
        o.release(id);
        assert!(o.admits(15005));
        let id2 = o.claim(15005).unwrap();
        assert_ne!(id, id2);
        o.release(id); // a stale id changes nothing
        assert!(!o.admits(15006));
        // The trial succeeds: back, and the backoff starts over.
        assert_eq!(o.success(15006), Change::Restored);
        assert!(o.admits(15006));
        assert_eq!(o.ejection(15006), None);
        for t in 0..3 {
            o.failure(20_000 + t, &S);
        }
        assert_eq!(ejected(&o, 20_002), Some(Duration::from_secs(5)));
        assert_eq!(o.total(), 3);
    }

    #[test]
    fn a_verdict_after_the_trial_guard_went_counts_as_the_trial() {
        // The guard of a failed attempt is dropped before the failure is recorded.
        let o = Outlier::default();
        for t in 0..3 {
            o.failure(t, &S);
        }
        let id = o.claim(6000).unwrap();
        o.release(id);
        assert!(matches!(
            o.failure(6001, &S),
            Change::Ejected { nth: 2, .. }
        ));
        let id = o.claim(16001).unwrap();
        o.release(id);
        assert_eq!(o.success(16002), Change::Restored);
    }

    #[test]
    fn off_and_reset() {
        let off = Settings {
            consecutive_failures: 0,
            ..S
        };
        let o = Outlier::default();
        for t in 0..10 {
            assert_eq!(o.failure(t, &off), Change::None);
        }
        assert!(o.admits(10));
        for t in 0..3 {
            o.failure(t, &S);
        }
        assert!(!o.admits(10));
        o.reset();
        assert!(o.admits(10));
        assert_eq!(o.ejection(10), None);
        assert_eq!(o.total(), 1, "the count of ejections survives");
    }
}
