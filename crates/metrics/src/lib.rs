//! Metric types shared by the server, the spool and the delivery engine, and the writer
//! of the Prometheus text exposition format (version 0.0.4) that `GET /metrics` serves.
//!
//! Counters are plain `AtomicU64`s owned by whoever counts; this crate adds what needs
//! more than one word: a [`Histogram`] with fixed buckets that any thread records into
//! without a lock, and an [`Exposition`] that writes families with their `# HELP` and
//! `# TYPE` lines and escapes label values.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds, in seconds, for durations from a fraction of a millisecond (an
/// fdatasync on a fast disk) to minutes (a delivery that waited for retries).
pub const LATENCY_BOUNDS_SECS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    60.0, 600.0,
];

/// A histogram of durations with fixed bucket bounds: one atomic add per bucket hit,
/// the sum kept in nanoseconds. Recorded from any thread without a lock; a reader may
/// see a recording half done (count ahead of a bucket), which Prometheus tolerates.
#[derive(Debug)]
pub struct Histogram {
    bounds_secs: &'static [f64],
    /// Per bound, the observations at or below it and above the previous bound; then
    /// one more for those above every bound.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// `bounds_secs` must be increasing.
    pub fn new(bounds_secs: &'static [f64]) -> Self {
        debug_assert!(bounds_secs.windows(2).all(|pair| pair[0] < pair[1]));
        Self {
            bounds_secs,
            buckets: (0..=bounds_secs.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// A histogram with [`LATENCY_BOUNDS_SECS`].
    pub fn latency() -> Self {
        Self::new(&LATENCY_BOUNDS_SECS)
    }

    pub fn record(&self, duration: Duration) {
        let secs = duration.as_secs_f64();
        let index = self.bounds_secs.partition_point(|&bound| bound < secs);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// What has been recorded so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0u64;
        let buckets = self
            .bounds_secs
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, bucket)| {
                cumulative += bucket.load(Ordering::Relaxed);
                (bound, cumulative)
            })
            .collect();
        let above = self
            .buckets
            .last()
            .map_or(0, |bucket| bucket.load(Ordering::Relaxed));
        // The count can run ahead of the buckets mid-recording; +Inf must not be below
        // the last finite bucket.
        let count = self.count.load(Ordering::Relaxed).max(cumulative + above);
        HistogramSnapshot {
            buckets,
            count,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram's cumulative buckets at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it).
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_secs: f64,
}

/// The text of a `/metrics` answer, family by family. Each family is written with
/// [`Exposition::family`] once, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// A metric family's kind, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines. A counter's `name` ends in
    /// `_total`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.text, " {}", number(value));
    }

    /// A histogram's samples: `_bucket` per bound and `+Inf`, `_sum`, `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], snapshot: &HistogramSnapshot) {
        for &(bound, count) in &snapshot.buckets {
            let _ = write!(self.text, "{name}_bucket");
            self.labels(labels, Some(&number(bound)));
            let _ = writeln!(self.text, " {count}");
        }
        let _ = write!(self.text, "{name}_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.text, " {}", snapshot.count);
        let _ = write!(self.text, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.text, " {}", number(snapshot.sum_secs));
        let _ = write!(self.text, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.text, " {}", snapshot.count);
    }

    pub fn finish(self) -> String {
        self.text
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.text.push('{');
        let mut first = true;
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (name, value) in all {
            if !first {
                self.text.push(',');
            }
            first = false;
            self.text.push_str(name);
            self.text.push_str("=\"");
            for character in value.chars() {
                match character {
                    '\\' => self.text.push_str("\\\\"),
                    '"' => self.text.push_str("\\\""),
                    '\n' => self.text.push_str("\\n"),
                    other => self.text.push(other),
                }
            }
            self.text.push('"');
        }
        self.text.push('}');
    }
}

/// A sample value as Prometheus writes it: integers without a fraction.
fn number(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        static BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];
        let histogram = Histogram::new(&BOUNDS);
        histogram.record(Duration::from_micros(1000)); // exactly on the first bound
        histogram.record(Duration::from_millis(5));
        histogram.record(Duration::from_secs(2)); // above every bound
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.buckets, vec![(0.001, 1), (0.01, 2), (0.1, 2)]);
        assert_eq!(snapshot.count, 3);
        assert!((snapshot.sum_secs - 2.006).abs() < 1e-9);
    }

    #[test]
    fn the_exposition_escapes_labels_and_writes_histograms_cumulatively() {
        static BOUNDS: [f64; 2] = [0.5, 1.0];
        let histogram = Histogram::new(&BOUNDS);
        histogram.record(Duration::from_millis(250));
        histogram.record(Duration::from_millis(750));
        let mut out = Exposition::default();
        out.family("demo_total", Kind::Counter, "A \\ demo.\nSecond line.");
        out.sample("demo_total", &[("upstream", "a\"b\\c\nd")], 3.0);
        out.family("wait_seconds", Kind::Histogram, "Waits.");
        out.histogram("wait_seconds", &[("kind", "x")], &histogram.snapshot());
        let text = out.finish();
        assert_eq!(
            text,
            "# HELP demo_total A \\\\ demo.\\nSecond line.\n\
             # TYPE demo_total counter\n\
             demo_total{upstream=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP wait_seconds Waits.\n\
             # TYPE wait_seconds histogram\n\
             wait_seconds_bucket{kind=\"x\",le=\"0.5\"} 1\n\
             wait_seconds_bucket{kind=\"x\",le=\"1\"} 2\n\
             wait_seconds_bucket{kind=\"x\",le=\"+Inf\"} 2\n\
             wait_seconds_sum{kind=\"x\"} 1\n\
             wait_seconds_count{kind=\"x\"} 2\n"
        );
    }

    proptest::proptest! {
        #[test]
        fn buckets_are_cumulative_and_the_count_is_every_observation(
            micros in proptest::collection::vec(0u64..2_000_000_000, 0..200)
        ) {
            let histogram = Histogram::latency();
            for &value in &micros {
                histogram.record(Duration::from_micros(value));
            }
            let snapshot = histogram.snapshot();
            proptest::prop_assert_eq!(snapshot.count, micros.len() as u64);
            for pair in snapshot.buckets.windows(2) {
                proptest::prop_assert!(pair[0].1 <= pair[1].1);
            }
            for &(bound, cumulative) in &snapshot.buckets {
                let expected = micros.iter().filter(|&&m| m as f64 / 1e6 <= bound).count() as u64;
                proptest::prop_assert_eq!(cumulative, expected);
            }
        }
    }
}
