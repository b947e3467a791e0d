//! A compact, mergeable quantile sketch with a relative-error guarantee (DDSketch's design with
//! a linearly interpolated logarithm).
//!
//! # Mapping
//! A value `v = 2^e · m` (`1 ≤ m < 2`) has the approximate base-2 logarithm `f(v) = e + (m − 1)`,
//! read off its bits with no `ln` call. Bucket `k` holds the values with
//! `k − 1 < c · f(v) ≤ k`. Within an octave `v` grows linearly with `f`, so a bucket spans at
//! most a ratio of `1 + 1/c` between its bounds; with `c = 1 / (γ − 1)` and
//! `γ = (1 + α) / (1 − α)` that ratio is at most `γ`, and the bucket's representative
//! `2·lo·hi / (lo + hi)` is within relative error `α` of every value in it, so any quantile
//! is returned within `α` of the true value at that rank. The price against the exact
//! logarithm is about 40% more distinct buckets; the sparse store only holds those touched.
//! Negative values use the same mapping on `|v|`; magnitudes below [`MIN_VALUE`] count as zero.
//!
//! # Store
//! One sorted sparse list of `(key, count)` pairs in a `Vec`, with negative and zero buckets
//! encoded into keys below every positive one, so a walk in key order is a walk in value order.
//! (A thin pointer, with length and capacity on the heap, made the pane smaller but made every
//! free read the cold heap header: 12% of a 1M-segment profile; the `Vec` measured 3-5%
//! faster.) Windows per segment usually hold few distinct buckets, so this
//! beats a dense array: a profile of the window bench showed a dense store (the
//! `sketches-ddsketch` crate, 1 KiB per sketch even for ten values) dominating memory and
//! cache misses.

/// Magnitudes below this are counted as zero.
pub const MIN_VALUE: f64 = 1e-9;

/// Encoded key of the zero bucket: below every positive key (≥ −1,500 at α = 1%).
const ZERO_KEY: i32 = -(1 << 24);
/// Negative values of magnitude key `k` are encoded `NEGATIVE_BASE − k`: below zero, and the
/// larger the magnitude the lower.
const NEGATIVE_BASE: i32 = -(1 << 25);

/// The parameters shared by all sketches of an engine (merging needs equal parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SketchParams {
    relative_accuracy: f64,
    /// Buckets per unit of the approximate base-2 logarithm.
    multiplier: f64,
}

impl SketchParams {
    /// `relative_accuracy` in (0, 1), e.g. 0.01 for 1%.
    pub fn new(relative_accuracy: f64) -> Self {
        assert!(
            relative_accuracy > 0.0 && relative_accuracy < 1.0,
            "relative accuracy should be in (0, 1)"
        );
        let gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy);
        SketchParams {
            relative_accuracy,
            multiplier: 1.0 / (gamma - 1.0),
        }
    }

    pub fn relative_accuracy(&self) -> f64 {
        self.relative_accuracy
    }

    /// Bucket of a finite magnitude ≥ `MIN_VALUE`.
    #[inline]
    fn key(&self, magnitude: f64) -> i32 {
        let bits = magnitude.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
        // The mantissa with a zero exponent is m in [1, 2).
        let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
        let x = (f64::from(exponent) + (m - 1.0)) * self.multiplier;
        // ceil without a libm call: truncation rounds toward zero.
        let t = x as i32;
        t + i32::from(f64::from(t) < x)
    }

    /// The value whose approximate logarithm is `f`.
    #[inline]
    fn inverse(f: f64) -> f64 {
        let e = f.floor();
        if e >= 1024.0 {
            return f64::MAX;
        }
        let pow2 = if e >= -1022.0 {
            f64::from_bits(((e as i64 + 1023) as u64) << 52)
        } else {
            2f64.powi(e as i32)
        };
        pow2 * (1.0 + (f - e))
    }

    /// The representative of bucket `key`.
    #[inline]
    fn value(&self, key: i32) -> f64 {
        let lo = Self::inverse(f64::from(key - 1) / self.multiplier);
        let hi = Self::inverse(f64::from(key) / self.multiplier);
        // 2·lo·hi / (lo + hi), written so it cannot overflow.
        2.0 / (1.0 / lo + 1.0 / hi)
    }

    /// The value a stored (encoded) key stands for.
    fn decode(&self, key: i32) -> f64 {
        if key == ZERO_KEY {
            0.0
        } else if key < ZERO_KEY {
            -self.value(NEGATIVE_BASE - key)
        } else {
            self.value(key)
        }
    }
}

/// A quantile sketch: sorted sparse `(encoded key, count)` buckets. Counts saturate at
/// `u32::MAX` per bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantileSketch {
    buckets: Vec<(i32, u32)>,
}

impl QuantileSketch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a finite value (non-finite values are the caller's to reject).
    #[inline]
    pub fn add(&mut self, params: &SketchParams, v: f64) {
        let key = if v > MIN_VALUE {
            params.key(v)
        } else if v < -MIN_VALUE {
            NEGATIVE_BASE - params.key(-v)
        } else {
            ZERO_KEY
        };
        self.add_key(key, 1);
    }

    #[inline]
    fn add_key(&mut self, key: i32, n: u32) {
        let b = &mut self.buckets;
        if b.capacity() == 0 {
            // A window's sketch usually gets several buckets: skip the smallest sizes.
            b.reserve(8);
        }
        // Values often repeat the newest or largest bucket: check the end first.
        if let Some(last) = b.last_mut() {
            if last.0 == key {
                last.1 = last.1.saturating_add(n);
                return;
            }
            if last.0 < key {
                b.push((key, n));
                return;
            }
        }
        match b.binary_search_by_key(&key, |e| e.0) {
            Ok(i) => b[i].1 = b[i].1.saturating_add(n),
            Err(i) => b.insert(i, (key, n)),
        }
    }

    /// Values added (saturated bucket counts undercount).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&(_, n)| u64::from(n)).sum()
    }

    /// Merges another sketch made with the same parameters.
    pub fn merge(&mut self, other: &QuantileSketch) {
        if other.buckets.is_empty() {
            return;
        }
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
            return;
        }
        let mut out = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut a, mut b) = (
            self.buckets.iter().peekable(),
            other.buckets.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    out.push((x.0, x.1.saturating_add(y.1)));
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.0 < y.0 => out.push(*a.next().expect("peeked")),
                (Some(_), Some(_)) | (None, Some(_)) => out.push(*b.next().expect("peeked")),
                (Some(_), None) => out.push(*a.next().expect("peeked")),
                (None, None) => break,
            }
        }
        self.buckets = out;
    }

    /// The value at rank `floor(q · (n − 1))` within the relative accuracy; `None` when empty
    /// or `q` is outside [0, 1].
    pub fn quantile(&self, params: &SketchParams, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        for &(key, n) in &self.buckets {
            seen += u64::from(n);
            if seen > rank {
                return Some(params.decode(key));
            }
        }
        self.buckets.last().map(|&(k, _)| params.decode(k))
    }

    /// Address of the buckets, for prefetch hints. Reading it never dereferences the store,
    /// so a hint costs no miss of its own.
    #[inline]
    pub fn store_addr(&self) -> *const u8 {
        self.buckets.as_ptr() as *const u8
    }

    /// Heap bytes held (for memory accounting), header included.
    pub fn heap_bytes(&self) -> usize {
        if self.buckets.capacity() == 0 {
            0
        } else {
            self.buckets.capacity() * std::mem::size_of::<(i32, u32)>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    #[test]
    fn quantiles_are_within_the_relative_accuracy() {
        let p = SketchParams::new(0.01);
        let mut s = QuantileSketch::new();
        let mut values: Vec<f64> = (0..10_000)
            .map(|i| ((i * 7919) % 10_007) as f64 * 0.37 - 200.0)
            .collect();
        for v in &values {
            s.add(&p, *v);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let truth = exact(&values, q);
            let est = s.quantile(&p, q).unwrap();
            assert!(
                (est - truth).abs() <= 0.01 * truth.abs() + 1e-9,
                "q={q}: {est} vs {truth}"
            );
        }
    }

    #[test]
    fn every_value_is_within_the_accuracy_and_buckets_follow_value_order() {
        for alpha in [0.01, 0.005, 0.05] {
            let p = SketchParams::new(alpha);
            let mut values = Vec::new();
            // Log-spaced magnitudes over the whole mapped range, octave edges and their
            // neighbours, both signs.
            let mut v = MIN_VALUE * 1.0001;
            while v < 1e300 {
                values.push(v);
                v *= 1.003_7;
            }
            for e in -29..1023 {
                let edge = 2f64.powi(e);
                values.extend([edge, edge.next_down(), edge.next_up()]);
            }
            values.push(f64::MAX);
            let negatives: Vec<f64> = values.iter().map(|v| -v).collect();
            values.extend(negatives);
            values.push(0.0);
            for &v in &values {
                let mut s = QuantileSketch::new();
                s.add(&p, v);
                let est = s.quantile(&p, 0.5).unwrap();
                assert!(
                    (est - v).abs() <= alpha * v.abs() * (1.0 + 1e-12),
                    "alpha={alpha} v={v:e}: {est:e}"
                );
            }
            // One sketch of everything: bucket order is value order.
            values.sort_by(f64::total_cmp);
            let mut all = QuantileSketch::new();
            for &v in &values {
                all.add(&p, v);
            }
            let decoded: Vec<f64> = all.buckets.iter().map(|&(k, _)| p.decode(k)).collect();
            assert!(decoded.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn merge_equals_adding_everything_to_one() {
        let p = SketchParams::new(0.01);
        let (mut a, mut b, mut all) = (
            QuantileSketch::new(),
            QuantileSketch::new(),
            QuantileSketch::new(),
        );
        for i in 0..1000 {
            let v = (i as f64).powf(1.7) - 50.0;
            if i % 3 == 0 { &mut a } else { &mut b }.add(&p, v);
            all.add(&p, v);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn empty_and_out_of_range_give_none() {
        let p = SketchParams::new(0.01);
        let mut s = QuantileSketch::new();
        assert_eq!(s.quantile(&p, 0.5), None);
        s.add(&p, 0.0);
        assert_eq!(s.quantile(&p, 0.5), Some(0.0));
        assert_eq!(s.quantile(&p, 1.5), None);
    }

    #[test]
    fn few_distinct_values_stay_small() {
        let p = SketchParams::new(0.01);
        let mut s = QuantileSketch::new();
        for i in 0..1000 {
            s.add(&p, 100.0 + (i % 10) as f64 * 10.0);
        }
        assert!(s.heap_bytes() <= 16 + 16 * 8, "{}", s.heap_bytes());
    }
}
