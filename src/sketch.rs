//! A compact, mergeable quantile sketch with a relative-error guarantee (the DDSketch mapping).
//!
//! A value `v > 0` goes to bucket `k = ceil(ln v / ln γ)` with `γ = (1 + α) / (1 − α)`; the
//! bucket's representative `2γ^k / (γ + 1)` is within relative error `α` of every value in it,
//! so any quantile is returned within `α` of the true value at that rank. Negative values use
//! the same mapping on `|v|`; magnitudes below `MIN_VALUE` count as zero.
//!
//! Why not the `sketches-ddsketch` crate: a profile of the window bench (100k segments, random
//! order) showed its dense `u64` store, allocated in 128-bin chunks (1 KiB per sketch even for
//! ten values), dominating memory and cache misses. Windows per segment usually hold few
//! distinct buckets, so this store is *sparse*: a sorted `(bucket, count)` list whose size is
//! the number of distinct buckets (bounded by ~2,400 at α = 1% over the whole f64 range we
//! map), 8 bytes each.

/// Magnitudes below this are counted as zero.
pub const MIN_VALUE: f64 = 1e-9;

/// The parameters shared by all sketches of an engine (merging needs equal parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SketchParams {
    relative_accuracy: f64,
    gamma: f64,
    inv_ln_gamma: f64,
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
            gamma,
            inv_ln_gamma: 1.0 / gamma.ln(),
        }
    }

    pub fn relative_accuracy(&self) -> f64 {
        self.relative_accuracy
    }

    #[inline]
    fn key(&self, magnitude: f64) -> i32 {
        (magnitude.ln() * self.inv_ln_gamma).ceil() as i32
    }

    #[inline]
    fn value(&self, key: i32) -> f64 {
        2.0 * self.gamma.powi(key) / (self.gamma + 1.0)
    }
}

/// Sorted sparse bucket counts.
#[derive(Debug, Clone, Default, PartialEq)]
struct Buckets(Vec<(i32, u32)>);

impl Buckets {
    #[inline]
    fn add(&mut self, key: i32, n: u32) {
        // Values often repeat the newest or largest bucket: check the end first.
        if let Some(last) = self.0.last_mut() {
            if last.0 == key {
                last.1 = last.1.saturating_add(n);
                return;
            }
            if last.0 < key {
                self.0.push((key, n));
                return;
            }
        }
        match self.0.binary_search_by_key(&key, |b| b.0) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(n),
            Err(i) => self.0.insert(i, (key, n)),
        }
    }

    fn merge(&mut self, other: &Buckets) {
        if other.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + other.0.len());
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
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
        self.0 = out;
    }

    fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<(i32, u32)>()
    }
}

/// A quantile sketch. Counts saturate at `u32::MAX` per bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantileSketch {
    positive: Buckets,
    negative: Buckets,
    zero: u64,
    count: u64,
}

impl QuantileSketch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a finite value (non-finite values are the caller's to reject).
    #[inline]
    pub fn add(&mut self, params: &SketchParams, v: f64) {
        self.count += 1;
        if v > MIN_VALUE {
            self.positive.add(params.key(v), 1);
        } else if v < -MIN_VALUE {
            self.negative.add(params.key(-v), 1);
        } else {
            self.zero += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Merges another sketch made with the same parameters.
    pub fn merge(&mut self, other: &QuantileSketch) {
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        self.zero += other.zero;
        self.count += other.count;
    }

    /// The value at rank `floor(q · (n − 1))` within the relative accuracy; `None` when empty
    /// or `q` is outside [0, 1].
    pub fn quantile(&self, params: &SketchParams, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // Most negative first: negative buckets by decreasing magnitude.
        for &(key, n) in self.negative.0.iter().rev() {
            seen += u64::from(n);
            if seen > rank {
                return Some(-params.value(key));
            }
        }
        seen += self.zero;
        if seen > rank {
            return Some(0.0);
        }
        for &(key, n) in &self.positive.0 {
            seen += u64::from(n);
            if seen > rank {
                return Some(params.value(key));
            }
        }
        // Saturated counts can leave the walk short: the largest bucket is the answer.
        self.positive
            .0
            .last()
            .map(|&(k, _)| params.value(k))
            .or(Some(0.0))
    }

    /// Address of the positive buckets, for prefetch hints (`None` when empty).
    pub fn data_ptr(&self) -> Option<*const u8> {
        (!self.positive.0.is_empty()).then_some(self.positive.0.as_ptr() as *const u8)
    }

    /// Heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.positive.heap_bytes() + self.negative.heap_bytes()
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
        assert!(s.heap_bytes() <= 16 * 8, "{}", s.heap_bytes());
    }
}
