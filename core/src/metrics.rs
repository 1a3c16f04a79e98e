//! Prometheus metrics in the text exposition format, for the server and the runner daemons.
//!
//! Hand-rolled on atomics, so that hot paths pay one atomic add each: each part of a process
//! implements [`Collect`], a [`Registry`] holds the parts a process serves, and every family
//! is written through [`Exposition`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram as `name_bucket`, `name_sum` and `name_count` samples.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, bound) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", bucket.load(Ordering::Relaxed));
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// What kind of family a metric is, as its `TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// The text of one scrape, in the Prometheus text exposition format. Every family is written
/// through here, with its `HELP` and `TYPE` lines, so that no renderer writes the format by
/// hand.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help, [(Labels::none(), value as f64)]);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help, [(Labels::none(), value)]);
    }

    /// A family of samples that differ by their labels.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str, samples: impl IntoIterator<Item = (Labels, f64)>) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.as_str());
        for (labels, value) in samples {
            let _ = writeln!(self.out, "{name}{} {value}", labels.0);
        }
    }

    /// A histogram, as `name_bucket`, `name_sum` and `name_count` samples.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        histogram.render(&mut self.out, name, help);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The labels of one sample, escaped, as written after its name (`{a="x",b="y"}`).
#[derive(Debug, Clone, Default)]
pub struct Labels(String);

impl Labels {
    /// No labels.
    pub fn none() -> Self {
        Labels(String::new())
    }

    /// These labels, values escaped.
    pub fn of(pairs: &[(&str, &str)]) -> Self {
        if pairs.is_empty() {
            return Labels::none();
        }
        let inner: Vec<String> = pairs.iter().map(|(key, value)| format!("{key}=\"{}\"", escape_label(value))).collect();
        Labels(format!("{{{}}}", inner.join(",")))
    }
}

/// Something with metrics to show at a process's `/metrics`.
pub trait Collect: Send + Sync {
    /// Writes this thing's families.
    fn collect(&self, out: &mut Exposition);
}

/// The metrics one process serves: every source registered, rendered in one pass.
#[derive(Clone, Default)]
pub struct Registry {
    sources: Vec<std::sync::Arc<dyn Collect>>,
}

impl Registry {
    /// Adds a source; sources render in the order they were added.
    pub fn register(&mut self, source: std::sync::Arc<dyn Collect>) {
        self.sources.push(source);
    }

    /// A registry with these sources.
    pub fn with(sources: impl IntoIterator<Item = std::sync::Arc<dyn Collect>>) -> Self {
        Registry { sources: sources.into_iter().collect() }
    }

    /// The text of one scrape.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        for source in &self.sources {
            source.collect(&mut out);
        }
        out.finish()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("sources", &self.sources.len()).finish()
    }
}

/// The MIME type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Escapes a label value (backslash, quote, newline).
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(9));
        let mut text = String::new();
        histogram.render(&mut text, "x_seconds", "help");
        assert!(text.contains("x_seconds_bucket{le=\"0.0025\"} 0\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"5\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_count 2\n"), "{text}");
        assert_eq!(escape_label("a\"b\\"), "a\\\"b\\\\");
    }

    struct Two;

    impl Collect for Two {
        fn collect(&self, out: &mut Exposition) {
            out.counter("c_total", "A counter.", 3);
            out.family("f_total", Kind::Counter, "By label.", [(Labels::of(&[("op", "a\"b"), ("n", "1")]), 2.0)]);
            out.gauge("g", "A gauge.", 0.5);
        }
    }

    #[test]
    fn a_registry_writes_each_family_with_its_help_and_type() {
        let text = Registry::with([std::sync::Arc::new(Two) as std::sync::Arc<dyn Collect>]).render();
        assert_eq!(
            text,
            "# HELP c_total A counter.\n# TYPE c_total counter\nc_total 3\n\
             # HELP f_total By label.\n# TYPE f_total counter\nf_total{op=\"a\\\"b\",n=\"1\"} 2\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 0.5\n"
        );
    }
}
