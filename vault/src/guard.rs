//! Abuse guards: reveal rates, daily distinct-order caps, failed-auth
//! throttling per peer address, and bulk-extraction detection.
//!
//! These are in-memory state machines driven by the engine's injected clock,
//! so tests move time instead of sleeping. State is per vault node and
//! shared by every connection of a principal. Daily distinct orders are also
//! written to the store with each reveal's audit events, and reloaded on the
//! first reveal of a principal after a restart, so a restart does not reset
//! a daily cap.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use crate::policy::Rate;
use crate::store::TokenId;

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC day number of a Unix-milliseconds time.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// A token bucket: holds up to `rate.count`, refills at `count / window`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last_ms: i64,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(rate: Rate, now_ms: i64) -> Bucket {
        Bucket {
            tokens: f64::from(rate.count),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: i64) {
        let elapsed = (now_ms - self.last_ms).max(0) as f64;
        let per_ms = f64::from(rate.count) / rate.window_ms as f64;
        self.tokens = (self.tokens + elapsed * per_ms).min(f64::from(rate.count));
        self.last_ms = now_ms.max(self.last_ms);
    }

    /// Takes `n` tokens, or says how long until `n` are available.
    pub fn take(&mut self, rate: Rate, n: u32, now_ms: i64) -> Result<(), u64> {
        self.refill(rate, now_ms);
        let n = f64::from(n);
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        let per_ms = f64::from(rate.count) / rate.window_ms as f64;
        // A request larger than the whole bucket can never pass: say so by
        // the time to fill the bucket from empty.
        let missing = (n.min(f64::from(rate.count)) - self.tokens).max(0.0);
        Err((missing / per_ms).ceil() as u64)
    }
}

/// The distinct orders a principal revealed on one UTC day.
#[derive(Debug, Default)]
pub struct DayOrders {
    /// The day.
    pub day: i64,
    /// Orders (or bare tokens) revealed that day.
    pub orders: HashSet<TokenId>,
}

/// Per-principal bulk-extraction detector: counts distinct orders per
/// window and compares the current window with the principal's own recent
/// baseline (the mean of the previous windows).
#[derive(Debug, Default)]
pub struct BulkWindow {
    start_ms: i64,
    orders: HashSet<TokenId>,
    history: VecDeque<u64>,
    alerted: bool,
}

/// Settings of the bulk-extraction detector.
#[derive(Clone, Copy, Debug)]
pub struct BulkConfig {
    /// Window length.
    pub window_ms: i64,
    /// Alert when the current window exceeds this multiple of the baseline.
    pub multiple: f64,
    /// ... and at least this many distinct orders (quiet principals are not
    /// flagged for revealing a handful).
    pub min_orders: u64,
    /// Windows kept for the baseline.
    pub history: usize,
}

impl Default for BulkConfig {
    fn default() -> Self {
        BulkConfig {
            window_ms: 3_600_000,
            multiple: 5.0,
            min_orders: 200,
            history: 24,
        }
    }
}

impl BulkWindow {
    /// Records orders revealed at `now`; returns `Some((count, baseline))`
    /// the first time in a window that the count crosses the threshold.
    pub fn record(
        &mut self,
        cfg: BulkConfig,
        now_ms: i64,
        orders: &[TokenId],
    ) -> Option<(u64, f64)> {
        if self.start_ms == 0 {
            self.start_ms = now_ms;
        }
        while now_ms >= self.start_ms + cfg.window_ms {
            self.history.push_back(self.orders.len() as u64);
            if self.history.len() > cfg.history {
                self.history.pop_front();
            }
            self.orders.clear();
            self.alerted = false;
            self.start_ms += cfg.window_ms;
            // Jump over long idle gaps in one step, recording them as zeros.
            if now_ms >= self.start_ms + cfg.window_ms * cfg.history as i64 {
                let skipped = (now_ms - self.start_ms) / cfg.window_ms;
                for _ in 0..skipped.min(cfg.history as i64) {
                    self.history.push_back(0);
                    if self.history.len() > cfg.history {
                        self.history.pop_front();
                    }
                }
                self.start_ms += skipped * cfg.window_ms;
            }
        }
        self.orders.extend(orders.iter().copied());
        let count = self.orders.len() as u64;
        let baseline = if self.history.is_empty() {
            0.0
        } else {
            self.history.iter().sum::<u64>() as f64 / self.history.len() as f64
        };
        let threshold = (baseline * cfg.multiple).max(cfg.min_orders as f64);
        if !self.alerted && count as f64 > threshold {
            self.alerted = true;
            return Some((count, baseline));
        }
        None
    }
}

/// Settings of the failed-authentication throttle.
#[derive(Clone, Copy, Debug)]
pub struct AuthThrottleConfig {
    /// Failures from one address within `window_ms` that trigger the block.
    pub max_failures: usize,
    /// The counting window.
    pub window_ms: i64,
    /// How long the address is then refused, even with a right key.
    pub backoff_ms: i64,
}

impl Default for AuthThrottleConfig {
    fn default() -> Self {
        AuthThrottleConfig {
            max_failures: 20,
            window_ms: 60_000,
            backoff_ms: 300_000,
        }
    }
}

/// Failed-authentication state of all peer addresses.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    peers: HashMap<IpAddr, PeerState>,
}

#[derive(Debug, Default)]
struct PeerState {
    failures: VecDeque<i64>,
    blocked_until: i64,
}

impl AuthThrottle {
    /// Milliseconds the address is still blocked for, if it is.
    pub fn blocked(&self, peer: IpAddr, now_ms: i64) -> Option<u64> {
        self.peers
            .get(&peer)
            .filter(|p| p.blocked_until > now_ms)
            .map(|p| (p.blocked_until - now_ms) as u64)
    }

    /// Records a failure; returns true when this failure starts a block.
    pub fn failure(&mut self, cfg: AuthThrottleConfig, peer: IpAddr, now_ms: i64) -> bool {
        // Bound memory under a flood from many addresses: forget peers whose
        // failures are all outside the window and who are not blocked.
        if self.peers.len() > 100_000 {
            self.peers.retain(|_, p| {
                p.blocked_until > now_ms
                    || p.failures
                        .back()
                        .is_some_and(|t| *t > now_ms - cfg.window_ms)
            });
        }
        let p = self.peers.entry(peer).or_default();
        if p.blocked_until > now_ms {
            return false;
        }
        p.failures.push_back(now_ms);
        while p
            .failures
            .front()
            .is_some_and(|t| *t <= now_ms - cfg.window_ms)
        {
            p.failures.pop_front();
        }
        if p.failures.len() >= cfg.max_failures {
            p.blocked_until = now_ms + cfg.backoff_ms;
            p.failures.clear();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_MIN_600: Rate = Rate {
        count: 600,
        window_ms: 60_000,
    };

    #[test]
    fn bucket_allows_the_burst_then_refills_at_the_rate() {
        let mut b = Bucket::full(PER_MIN_600, 0);
        assert_eq!(b.take(PER_MIN_600, 600, 0), Ok(()));
        // Empty: one more needs 100 ms (600/min = 10/s).
        assert_eq!(b.take(PER_MIN_600, 1, 0), Err(100));
        assert_eq!(b.take(PER_MIN_600, 1, 100), Ok(()));
        // Never more than the burst, however long idle.
        assert_eq!(b.take(PER_MIN_600, 600, 10_000_000), Ok(()));
        assert!(b.take(PER_MIN_600, 1, 10_000_000).is_err());
        // A request bigger than the bucket is refused with the fill time.
        let mut b = Bucket::full(PER_MIN_600, 0);
        assert_eq!(b.take(PER_MIN_600, 601, 0), Err(0));
    }

    #[test]
    fn days_are_utc_day_numbers() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY_MS - 1), 0);
        assert_eq!(day_of(DAY_MS), 1);
    }

    #[test]
    fn auth_throttle_blocks_one_address_for_the_backoff() {
        let cfg = AuthThrottleConfig {
            max_failures: 3,
            window_ms: 1_000,
            backoff_ms: 10_000,
        };
        let bad: IpAddr = "127.0.0.9".parse().expect("ip");
        let good: IpAddr = "127.0.0.1".parse().expect("ip");
        let mut t = AuthThrottle::default();
        assert!(!t.failure(cfg, bad, 0));
        assert!(!t.failure(cfg, bad, 10));
        assert!(
            t.failure(cfg, bad, 20),
            "third failure in the window blocks"
        );
        assert_eq!(t.blocked(bad, 20), Some(10_000));
        assert_eq!(t.blocked(good, 20), None);
        assert_eq!(t.blocked(bad, 10_020), None, "the block ends");
        // Failures spread beyond the window never block.
        let mut t = AuthThrottle::default();
        for i in 0..10 {
            assert!(!t.failure(cfg, bad, i * 600));
        }
    }

    #[test]
    fn bulk_detector_compares_with_the_principals_own_baseline() {
        let cfg = BulkConfig {
            window_ms: 1_000,
            multiple: 3.0,
            min_orders: 50,
            history: 4,
        };
        let ids = |from: u32, n: u32| -> Vec<TokenId> {
            (from..from + n)
                .map(|i| {
                    let mut id = [0u8; 16];
                    id[..4].copy_from_slice(&i.to_be_bytes());
                    id
                })
                .collect()
        };
        let mut w = BulkWindow::default();
        // Four quiet windows of 20 distinct orders each.
        for win in 0..4 {
            assert_eq!(
                w.record(cfg, 1 + win * 1_000, &ids(win as u32 * 100, 20)),
                None
            );
        }
        // 60 is at 3x the baseline of 20: not above it.
        assert_eq!(w.record(cfg, 4_001, &ids(1_000, 60)), None);
        assert_eq!(w.record(cfg, 4_002, &ids(2_000, 1)), Some((61, 20.0)));
        // Alerted once per window.
        assert_eq!(w.record(cfg, 4_003, &ids(3_000, 50)), None);
    }
}
