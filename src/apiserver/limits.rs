//! The counters behind a managed key's limits ([`crate::wire::keys::Limits`]), in
//! microseconds of wall-clock time, kept per key and per (key, model): requests and tokens
//! per minute as a sliding window over wall-clock minutes, tokens per UTC day, and requests
//! in flight.
//!
//! Minutes are wall-clock minutes (unix seconds / 60) because the apiservers of a cluster
//! share them: each one reports what it counted in the current minute through the key sync,
//! and the controller answers every apiserver's counts of the current and the previous
//! minute together. The estimate for "the last 60 s" is the sliding-window counter:
//! `previous × (1 − elapsed fraction of the current minute) + current`, where each minute's
//! count is the cluster's figure from the last sync plus what this apiserver counted since
//! (not yet reported, or reported in a sync still under way). The other apiservers' traffic
//! since the last sync is unseen: limits hold cluster-wide within one sync interval.
//!
//! A request is admitted while the estimate is below the limit (`rpm`: one more request
//! fits; `tpm`, `daily_tokens`: some tokens are left, since a request's tokens are known only
//! when its answer ends). Requests in flight are an atomic per scope, local to the apiserver.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Microseconds in a minute and in a day.
pub const MINUTE_US: i64 = 60_000_000;
pub const DAY_US: i64 = 86_400_000_000;

/// Microseconds since the Unix epoch (wall clock).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Requests and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub requests: u64,
    pub tokens: u64,
}

impl Count {
    fn add(&mut self, o: Count) {
        self.requests += o.requests;
        self.tokens += o.tokens;
    }

    fn is_zero(&self) -> bool {
        self.requests == 0 && self.tokens == 0
    }
}

/// One wall-clock minute's counts.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    minute: i64,
    /// Every apiserver's count, as of the last sync.
    cluster: Count,
    /// Counted here since the last report.
    unsynced: Count,
    /// Counted here and in the report under way.
    sending: Count,
}

impl Slot {
    fn total(&self) -> Count {
        let mut c = self.cluster;
        c.add(self.unsynced);
        c.add(self.sending);
        c
    }
}

/// Tokens of one UTC day.
#[derive(Debug, Clone, Copy, Default)]
struct Day {
    day: i64,
    cluster: u64,
    unsynced: u64,
    sending: u64,
}

impl Day {
    fn total(&self) -> u64 {
        self.cluster + self.unsynced + self.sending
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// Indexed by minute parity: the current and the previous minute.
    slots: [Slot; 2],
    day: Day,
}

impl Counters {
    /// The slot of `minute`, emptied when it held an older minute.
    fn slot(&mut self, minute: i64) -> &mut Slot {
        let s = &mut self.slots[minute.rem_euclid(2) as usize];
        if s.minute != minute {
            *s = Slot {
                minute,
                ..Slot::default()
            };
        }
        s
    }

    /// The counts of `minute` (zero when not held).
    fn of(&self, minute: i64) -> Count {
        let s = &self.slots[minute.rem_euclid(2) as usize];
        if s.minute == minute {
            s.total()
        } else {
            Count::default()
        }
    }

    fn day(&mut self, day: i64) -> &mut Day {
        if self.day.day != day {
            self.day = Day {
                day,
                ..Day::default()
            };
        }
        &mut self.day
    }
}

/// Which limit a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Rpm,
    Tpm,
    MaxConcurrency,
    DailyTokens,
}

impl LimitKind {
    /// The label in `/metrics` and the name in messages (the `dbgpt keys` flag).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Rpm => "rpm",
            LimitKind::Tpm => "tpm",
            LimitKind::MaxConcurrency => "max_concurrency",
            LimitKind::DailyTokens => "daily_tokens",
        }
    }

    /// OpenAI's error `type` suffix: `requests` or `tokens`.
    pub fn unit(self) -> &'static str {
        match self {
            LimitKind::Rpm | LimitKind::MaxConcurrency => "requests",
            LimitKind::Tpm | LimitKind::DailyTokens => "tokens",
        }
    }
}

/// A refused request: the limit, its value, what was used, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub kind: LimitKind,
    pub limit: u64,
    pub used: u64,
    pub retry_after_us: i64,
}

/// The `x-ratelimit-*` figures of one unit (requests or tokens) per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window has forgotten every counted request (or token).
    pub reset_us: i64,
}

/// The figures a successful answer's `x-ratelimit-*` headers carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub requests: Option<Headroom>,
    pub tokens: Option<Headroom>,
}

/// The limits and counters of one key, or of one key on one model.
#[derive(Debug, Default)]
pub struct Scope {
    in_flight: AtomicU64,
    counters: Mutex<Counters>,
}

/// The sliding-window estimate of the last minute at `now`, as floats (requests, tokens).
fn estimate(prev: Count, cur: Count, frac: f64) -> (f64, f64) {
    (
        prev.requests as f64 * (1.0 - frac) + cur.requests as f64,
        prev.tokens as f64 * (1.0 - frac) + cur.tokens as f64,
    )
}

/// Microseconds from now (fraction `frac` into the current minute) until
/// `prev × (1 − f) + cur + need ≤ limit`.
fn wait_us(prev: u64, cur: u64, need: u64, limit: u64, frac: f64) -> i64 {
    let (prev, cur, need, limit) = (prev as f64, cur as f64, need as f64, limit as f64);
    let minutes = if cur + need > limit {
        // Only in the next minute, once the current one has decayed enough.
        let f2 = if cur > 0.0 {
            (1.0 - (limit - need) / cur).clamp(0.0, 1.0)
        } else {
            1.0
        };
        (1.0 - frac) + f2
    } else if prev > 0.0 && prev * (1.0 - frac) + cur + need > limit {
        ((1.0 - (limit - cur - need) / prev) - frac).max(0.0)
    } else {
        0.0
    };
    // Rounded up, plus a millisecond of slack.
    (minutes * MINUTE_US as f64).ceil() as i64 + 1_000
}

/// Microseconds until the window has forgotten every count.
fn reset_us(prev: u64, cur: u64, frac: f64) -> i64 {
    let rest = ((1.0 - frac) * MINUTE_US as f64).ceil() as i64;
    if cur > 0 {
        rest + MINUTE_US
    } else if prev > 0 {
        rest
    } else {
        0
    }
}

impl Scope {
    /// Admits one request at `now_us` under `limits` (checks, then counts it), or says which
    /// limit it is over. On success the request is in flight until [`Scope::release`].
    pub fn admit(
        &self,
        limits: &crate::wire::keys::Limits,
        now_us: i64,
    ) -> Result<Status, Exceeded> {
        if let Some(max) = limits.max_concurrency {
            let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
            if before >= max {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Exceeded {
                    kind: LimitKind::MaxConcurrency,
                    limit: max,
                    used: before,
                    retry_after_us: 1_000_000,
                });
            }
        }
        let refused = |e: Exceeded| {
            if limits.max_concurrency.is_some() {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            Err(e)
        };
        let minute = now_us.div_euclid(MINUTE_US);
        let frac = now_us.rem_euclid(MINUTE_US) as f64 / MINUTE_US as f64;
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let (prev, cur) = (c.of(minute - 1), c.of(minute));
        let (req, tok) = estimate(prev, cur, frac);
        if let Some(rpm) = limits.rpm
            && req + 1.0 > rpm as f64
        {
            return refused(Exceeded {
                kind: LimitKind::Rpm,
                limit: rpm,
                used: req.ceil() as u64,
                retry_after_us: wait_us(prev.requests, cur.requests, 1, rpm, frac),
            });
        }
        if let Some(tpm) = limits.tpm
            && tok >= tpm as f64
        {
            return refused(Exceeded {
                kind: LimitKind::Tpm,
                limit: tpm,
                used: tok.ceil() as u64,
                retry_after_us: wait_us(prev.tokens, cur.tokens, 1, tpm, frac),
            });
        }
        if let Some(daily) = limits.daily_tokens {
            let used = c.day(now_us.div_euclid(DAY_US)).total();
            if used >= daily {
                return refused(Exceeded {
                    kind: LimitKind::DailyTokens,
                    limit: daily,
                    used,
                    retry_after_us: DAY_US - now_us.rem_euclid(DAY_US),
                });
            }
        }
        c.slot(minute).unsynced.requests += 1;
        let status = Status {
            requests: limits.rpm.map(|rpm| Headroom {
                limit: rpm,
                remaining: rpm.saturating_sub((req + 1.0).ceil() as u64),
                reset_us: reset_us(prev.requests, cur.requests + 1, frac),
            }),
            tokens: limits.tpm.map(|tpm| Headroom {
                limit: tpm,
                remaining: tpm.saturating_sub(tok.ceil() as u64),
                reset_us: reset_us(prev.tokens, cur.tokens, frac),
            }),
        };
        Ok(status)
    }

    /// Takes back an admission (a narrower scope refused the request).
    pub fn cancel(&self, limits: &crate::wire::keys::Limits, now_us: i64) {
        if limits.max_concurrency.is_some() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let s = c.slot(now_us.div_euclid(MINUTE_US));
        s.unsynced.requests = s.unsynced.requests.saturating_sub(1);
    }

    /// The figures of the `x-ratelimit-*` headers at `now_us`, counting nothing.
    pub fn status(&self, limits: &crate::wire::keys::Limits, now_us: i64) -> Status {
        let minute = now_us.div_euclid(MINUTE_US);
        let frac = now_us.rem_euclid(MINUTE_US) as f64 / MINUTE_US as f64;
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let (prev, cur) = (c.of(minute - 1), c.of(minute));
        drop(c);
        let (req, tok) = estimate(prev, cur, frac);
        Status {
            requests: limits.rpm.map(|rpm| Headroom {
                limit: rpm,
                remaining: rpm.saturating_sub(req.ceil() as u64),
                reset_us: reset_us(prev.requests, cur.requests, frac),
            }),
            tokens: limits.tpm.map(|tpm| Headroom {
                limit: tpm,
                remaining: tpm.saturating_sub(tok.ceil() as u64),
                reset_us: reset_us(prev.tokens, cur.tokens, frac),
            }),
        }
    }

    /// Ends a request admitted under `limits`: it leaves the in-flight count, and its
    /// `tokens` are counted at `now_us`.
    pub fn release(&self, limits: &crate::wire::keys::Limits, tokens: u64, now_us: i64) {
        if limits.max_concurrency.is_some() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.charge(tokens, now_us);
    }

    /// Counts `tokens` at `now_us`.
    pub fn charge(&self, tokens: u64, now_us: i64) {
        if tokens == 0 {
            return;
        }
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.slot(now_us.div_euclid(MINUTE_US)).unsynced.tokens += tokens;
        c.day(now_us.div_euclid(DAY_US)).unsynced += tokens;
    }

    /// Requests in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What to report: the counts of each minute held since the last report (moved to
    /// "sending" until [`Scope::synced`] or [`Scope::sync_failed`]).
    pub fn take_report(&self) -> Vec<(i64, Count)> {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for s in &mut c.slots {
            if !s.unsynced.is_zero() {
                out.push((s.minute, s.unsynced));
                s.sending.add(s.unsynced);
                s.unsynced = Count::default();
            }
        }
        c.day.sending += c.day.unsynced;
        c.day.unsynced = 0;
        out
    }

    /// The report went through; `minutes` are the cluster's counts of the minutes the
    /// answer covers (`covered`: the current and previous minute at the answer), `daily` the
    /// cluster's tokens today (`None`: not given for this scope).
    pub fn synced(&self, covered: [i64; 2], minutes: &[(i64, Count)], daily: Option<(i64, u64)>) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for s in &mut c.slots {
            s.sending = Count::default();
        }
        for m in covered {
            let cluster = minutes
                .iter()
                .find(|(mm, _)| *mm == m)
                .map(|(_, n)| *n)
                .unwrap_or_default();
            c.slot(m).cluster = cluster;
        }
        c.day.sending = 0;
        if let Some((day, tokens)) = daily {
            c.day(day).cluster = tokens;
        }
    }

    /// The report failed: its counts are reported next time.
    pub fn sync_failed(&self) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for s in &mut c.slots {
            let sending = std::mem::take(&mut s.sending);
            s.unsynced.add(sending);
        }
        let sending = std::mem::take(&mut c.day.sending);
        c.day.unsynced += sending;
    }
}

/// `a / b` rounded up (`a ≥ 0`, `b > 0`).
pub fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `1m30s`, `6s`, `250ms`.
pub fn openai_duration(us: i64) -> String {
    let us = us.max(0);
    if us < 1_000_000 {
        return format!("{}ms", ceil_div(us, 1_000));
    }
    let secs = ceil_div(us, 1_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::keys::Limits;

    /// 10:00:00.000 of some day, in µs, at a minute boundary.
    const T0: i64 = 1_800_000_000 * 1_000_000 / MINUTE_US * MINUTE_US;

    fn limits(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>, daily: Option<u64>) -> Limits {
        Limits {
            rpm,
            tpm,
            max_concurrency: conc,
            daily_tokens: daily,
        }
    }

    #[test]
    fn rpm_admits_up_to_the_limit_then_refuses_with_a_wait() {
        let s = Scope::default();
        let l = limits(Some(3), None, None, None);
        for i in 0..3 {
            let st = s.admit(&l, T0 + i).unwrap();
            assert_eq!(st.requests.unwrap().remaining, 2 - i as u64);
        }
        let e = s.admit(&l, T0 + 10).unwrap_err();
        assert_eq!((e.kind, e.limit, e.used), (LimitKind::Rpm, 3, 3));
        // Three requests in this minute: the next fits once they have decayed below 2,
        // i.e. a third of the way into the next minute.
        let expect = MINUTE_US + MINUTE_US / 3;
        assert!(
            (e.retry_after_us - expect).abs() < 10_000,
            "{} vs {expect}",
            e.retry_after_us
        );
        // A third into the next minute: 3 × (1 − 1/3) = 2 < 3 → admitted again.
        assert!(s.admit(&l, T0 + expect + 1_000).is_ok());
        assert!(s.admit(&l, T0 + expect + 2_000).is_err());
    }

    #[test]
    fn the_previous_minute_decays() {
        let s = Scope::default();
        let l = limits(Some(10), None, None, None);
        for i in 0..10 {
            s.admit(&l, T0 + i).unwrap();
        }
        // Half-way into the next minute 5 of them still count: 5 more fit.
        let half = T0 + MINUTE_US + MINUTE_US / 2;
        for i in 0..5 {
            s.admit(&l, half + i).unwrap();
        }
        let e = s.admit(&l, half + 10).unwrap_err();
        assert_eq!(e.kind, LimitKind::Rpm);
        // Two minutes later everything is forgotten.
        assert!(s.admit(&l, T0 + 3 * MINUTE_US).is_ok());
    }

    #[test]
    fn tokens_refuse_once_spent_and_daily_until_midnight() {
        let s = Scope::default();
        let l = limits(None, Some(100), None, None);
        s.admit(&l, T0).unwrap();
        s.release(&l, 60, T0 + 1);
        let st = s.admit(&l, T0 + 2).unwrap();
        assert_eq!(st.tokens.unwrap().remaining, 40);
        s.release(&l, 50, T0 + 3);
        let e = s.admit(&l, T0 + 4).unwrap_err();
        assert_eq!((e.kind, e.limit, e.used), (LimitKind::Tpm, 100, 110));
        assert!(e.retry_after_us > MINUTE_US);

        let d = Scope::default();
        let l = limits(None, None, None, Some(1000));
        d.admit(&l, T0).unwrap();
        d.release(&l, 1000, T0);
        let e = d.admit(&l, T0 + 1).unwrap_err();
        assert_eq!(e.kind, LimitKind::DailyTokens);
        assert_eq!(e.retry_after_us, DAY_US - (T0 + 1).rem_euclid(DAY_US));
        let tomorrow = (T0 / DAY_US + 1) * DAY_US;
        assert!(d.admit(&l, tomorrow).is_ok());
    }

    #[test]
    fn concurrency_is_held_until_release_and_refusals_hold_nothing() {
        let s = Scope::default();
        let l = limits(Some(100), None, Some(2), None);
        s.admit(&l, T0).unwrap();
        s.admit(&l, T0).unwrap();
        let e = s.admit(&l, T0).unwrap_err();
        assert_eq!((e.kind, e.limit), (LimitKind::MaxConcurrency, 2));
        assert_eq!(s.in_flight(), 2);
        s.release(&l, 0, T0);
        assert_eq!(s.in_flight(), 1);
        s.admit(&l, T0).unwrap();
        // A request refused by rpm does not keep a concurrency slot.
        let l1 = limits(Some(3), None, Some(10), None);
        let t = Scope::default();
        for _ in 0..3 {
            t.admit(&l1, T0).unwrap();
        }
        assert_eq!(t.admit(&l1, T0).unwrap_err().kind, LimitKind::Rpm);
        assert_eq!(t.in_flight(), 3);
    }

    #[test]
    fn cluster_counts_replace_reported_ones_and_failed_reports_are_kept() {
        let s = Scope::default();
        let l = limits(Some(10), None, None, None);
        for _ in 0..4 {
            s.admit(&l, T0).unwrap();
        }
        s.charge(7, T0);
        let report = s.take_report();
        assert_eq!(
            report,
            vec![(
                T0 / MINUTE_US,
                Count {
                    requests: 4,
                    tokens: 7
                }
            )]
        );
        // Counted while the report is under way: still counted locally.
        assert_eq!(s.admit(&l, T0).unwrap().requests.unwrap().remaining, 5);
        // The report failed: everything is reported next time.
        s.sync_failed();
        let report = s.take_report();
        assert_eq!(report[0].1.requests, 5);
        // Another apiserver used 4 more this minute: the cluster says 9 (ours included).
        let m = T0 / MINUTE_US;
        s.synced(
            [m, m - 1],
            &[(
                m,
                Count {
                    requests: 9,
                    tokens: 7,
                },
            )],
            Some((T0 / DAY_US, 500)),
        );
        assert!(s.admit(&l, T0 + 1).is_ok());
        assert_eq!(s.admit(&l, T0 + 2).unwrap_err().kind, LimitKind::Rpm);
        assert!(s.take_report()[0].1.requests == 1);
        let d = limits(None, None, None, Some(500));
        assert_eq!(
            s.admit(&d, T0 + 3).unwrap_err().kind,
            LimitKind::DailyTokens
        );
    }

    #[test]
    fn openai_durations() {
        assert_eq!(openai_duration(250_000), "250ms");
        assert_eq!(openai_duration(6_000_000), "6s");
        assert_eq!(openai_duration(90_000_000), "1m30s");
        assert_eq!(openai_duration(3_600_000_000), "1h0m0s");
        assert_eq!(openai_duration(-5), "0ms");
    }
}
