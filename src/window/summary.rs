//! Aggregates and summaries: what a pane holds per measurement, and what a closed window
//! reports.

use super::*;

/// Running aggregates of one measurement in one pane.
#[derive(Clone, Debug, Default)]
pub(super) struct Agg {
    pub(super) count: u64,
    pub(super) sum: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) sketch: Option<QuantileSketch>,
}

impl Agg {
    pub(super) fn new(with_sketch: bool) -> Self {
        Agg {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sketch: with_sketch.then(QuantileSketch::new),
        }
    }

    #[inline]
    pub(super) fn add(&mut self, params: &SketchParams, v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if let Some(s) = self.sketch.as_mut() {
            s.add(params, v);
        }
    }

    pub(super) fn merge(&mut self, other: &Agg) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        match (self.sketch.as_mut(), other.sketch.as_ref()) {
            (Some(a), Some(b)) => a.merge(b),
            (None, Some(b)) => self.sketch = Some(b.clone()),
            _ => {}
        }
    }
}

/// Aggregates of one measurement over a closed window.
#[derive(Clone, Debug)]
pub struct MeasurementSummary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Present for the configured quantile measurements.
    pub sketch: Option<QuantileSketch>,
    pub(super) params: SketchParams,
}

impl MeasurementSummary {
    pub(super) fn from_agg(agg: Agg, params: SketchParams) -> Self {
        MeasurementSummary {
            count: agg.count,
            sum: agg.sum,
            min: agg.min,
            max: agg.max,
            sketch: agg.sketch,
            params,
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The q-quantile (0 ≤ q ≤ 1) within the sketch's relative accuracy; `None` without values
    /// or without a sketch for this measurement.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.as_ref()?.quantile(&self.params, q)
    }
}

/// A window's measurements, sorted by name (the usual one or two live inline).
pub type Measurements = SmallVec<[(Arc<str>, MeasurementSummary); INLINE_MEASUREMENTS]>;

/// One closed window of one segment: the immutable input to policies.
#[derive(Debug, Clone)]
pub struct WindowSummary {
    pub partition: i32,
    pub segment: Arc<str>,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Events in the window (0 = no data).
    pub count: u64,
    /// Per measurement, sorted by name.
    pub measurements: Measurements,
    /// The window group (`None`: the default windows); policies judge their group's windows.
    pub group: Option<Arc<str>>,
}

impl WindowSummary {
    /// A summary built from raw values (tests, simulations, backtest fixtures): `count` is the
    /// number of events, each measurement lists its values; `quantile` names the measurements
    /// that get a sketch with the given relative accuracy.
    pub fn from_values(
        partition: i32,
        segment: &str,
        (start_ms, end_ms): (i64, i64),
        count: u64,
        measurements: &[(&str, &[f64])],
        quantile: &[&str],
        relative_accuracy: f64,
    ) -> WindowSummary {
        let params = SketchParams::new(relative_accuracy);
        let mut ms: Measurements = measurements
            .iter()
            .map(|(name, values)| {
                let mut agg = Agg::new(quantile.contains(name));
                for v in values.iter().filter(|v| v.is_finite()) {
                    agg.add(&params, *v);
                }
                (Arc::from(*name), MeasurementSummary::from_agg(agg, params))
            })
            .collect();
        ms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        WindowSummary {
            partition,
            segment: Arc::from(segment),
            start_ms,
            end_ms,
            count,
            measurements: ms,
            group: None,
        }
    }

    pub fn measurement(&self, name: &str) -> Option<&MeasurementSummary> {
        self.measurements
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.measurements[i].1)
    }

    pub fn duration_secs(&self) -> f64 {
        (self.end_ms - self.start_ms) as f64 / 1000.0
    }

    /// Events per second over the window.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.duration_secs()
    }

    /// Sum of a measurement per second over the window (e.g. errors/s); 0 without values.
    pub fn rate_of(&self, name: &str) -> f64 {
        self.measurement(name).map_or(0.0, |m| m.sum) / self.duration_secs()
    }
}
