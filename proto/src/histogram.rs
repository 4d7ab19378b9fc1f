//! Behaviour of the wire type [`LogHistogram`]: recording, merging and
//! quantiles. The bucket scheme is part of the protocol (see `agent.proto`):
//! bucket `i` holds the values `v` with `floor(4 * log2(max(v, 1))) == i`.

use crate::edgefleet::v1::LogHistogram;

/// Buckets per power of two.
pub const BUCKETS_PER_OCTAVE: u32 = 4;

/// The bucket a value falls into.
pub fn bucket_of(value: u64) -> u32 {
    let v = value.max(1);
    let octave = 63 - v.leading_zeros();
    // Position inside the octave from the bits under the leading one, compared
    // against the exact quarter-octave boundaries 2^(k/4).
    let fraction = v as f64 / (1u64 << octave) as f64;
    let mut sub = 0;
    while sub + 1 < BUCKETS_PER_OCTAVE && fraction >= 2f64.powf(f64::from(sub + 1) / 4.0) {
        sub += 1;
    }
    octave * BUCKETS_PER_OCTAVE + sub
}

/// The smallest value of a bucket (rounded up to an integer).
pub fn bucket_lower_bound(bucket: u32) -> u64 {
    2f64.powf(f64::from(bucket) / f64::from(BUCKETS_PER_OCTAVE))
        .ceil() as u64
}

impl LogHistogram {
    /// Adds one observation.
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Adds `n` observations of the same value.
    pub fn record_n(&mut self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.add_to_bucket(bucket_of(value), n);
        self.sum = self.sum.saturating_add(value.saturating_mul(n));
    }

    fn add_to_bucket(&mut self, bucket: u32, n: u64) {
        if self.counts.is_empty() {
            self.first_bucket = bucket;
            self.counts.push(n);
            return;
        }
        if bucket < self.first_bucket {
            let grow = (self.first_bucket - bucket) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.first_bucket = bucket;
        }
        let index = (bucket - self.first_bucket) as usize;
        if index >= self.counts.len() {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] = self.counts[index].saturating_add(n);
    }

    /// Adds every observation of `other`.
    pub fn merge(&mut self, other: &LogHistogram) {
        for (k, &n) in other.counts.iter().enumerate() {
            if n > 0 {
                self.add_to_bucket(other.first_bucket.saturating_add(k as u32), n);
            }
        }
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The lower bound of the bucket holding quantile `q` (0..=1), or `None`
    /// when empty. Accurate to one bucket (about 19%).
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (k, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_lower_bound(self.first_bucket + k as u32));
            }
        }
        None
    }

    /// Drops leading and trailing empty buckets (smaller on the wire).
    pub fn trim(&mut self) {
        let Some(first) = self.counts.iter().position(|&n| n > 0) else {
            self.counts.clear();
            self.first_bucket = 0;
            return;
        };
        let last = self.counts.iter().rposition(|&n| n > 0).unwrap_or(first);
        self.counts.truncate(last + 1);
        self.counts.drain(..first);
        self.first_bucket += first as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_quarter_octaves() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 4);
        assert_eq!(bucket_of(3), 6); // 2^(6/4) = 2.83 <= 3 < 2^(7/4) = 3.36
        assert_eq!(bucket_of(1024), 40);
        assert_eq!(bucket_of(1219), 41); // 2^(41/4) = 1217.9
        assert_eq!(bucket_of(1217), 40);
        for v in [1u64, 5, 100, 12_345, 9_999_999, u64::MAX / 3] {
            let b = bucket_of(v);
            assert!(bucket_lower_bound(b) <= v, "{v} below its bucket {b}");
            assert!(bucket_lower_bound(b + 1) > v, "{v} above its bucket {b}");
        }
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (
            LogHistogram::default(),
            LogHistogram::default(),
            LogHistogram::default(),
        );
        for v in [3u64, 70, 900, 900, 15_000] {
            a.record(v);
            all.record(v);
        }
        for v in [1u64, 2, 40_000] {
            b.record(v);
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(a.count(), 8);
        assert_eq!(a.sum, 3 + 70 + 900 + 900 + 15_000 + 1 + 2 + 40_000);
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let mut h = LogHistogram::default();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((420..=500).contains(&p50), "p50 {p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((830..=990).contains(&p99), "p99 {p99}");
        assert_eq!(LogHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn trim_keeps_the_observations() {
        let mut h = LogHistogram {
            first_bucket: 3,
            counts: vec![0, 0, 5, 0, 2, 0],
            sum: 9,
        };
        h.trim();
        assert_eq!(
            h,
            LogHistogram {
                first_bucket: 5,
                counts: vec![5, 0, 2],
                sum: 9
            }
        );
    }
}
