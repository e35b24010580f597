//! The Prometheus text format for the figures the engines and relays publish
//! as they work (bucket histograms, a float CPU counter): a scrape reads
//! them and renders them here, beside the `metrics` exporter's families.
//!
//! The exporter can only add to a histogram one observation at a time; these
//! histograms are kept by the engine itself (atomic buckets, see
//! `cellpay_cell::Buckets`), so their cumulative counts are written as they
//! are. Each family is written once, HELP and TYPE first.

use std::fmt::Write;

use cellpay_cell::BucketCounts;

/// A Prometheus metric type, as the `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its name, type and help text.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// A label set: (name, value) pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Text in the Prometheus exposition format (version 0.0.4).
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, f: &Family) {
        let help = f.help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {} {help}\n# TYPE {} {}", f.name, f.name, f.kind.as_str());
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.line(name, "", labels, None, value);
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram series.
    pub fn histogram(&mut self, name: &str, labels: Labels<'_>, h: &BucketCounts) {
        for (bound, count) in h.bounds.iter().zip(&h.cumulative) {
            self.line(name, "_bucket", labels, Some(&bound.to_string()), *count as f64);
        }
        self.line(name, "_bucket", labels, Some("+Inf"), h.count as f64);
        self.line(name, "_sum", labels, None, h.sum);
        self.line(name, "_count", labels, None, h.count as f64);
    }

    fn line(&mut self, name: &str, suffix: &str, labels: Labels<'_>, le: Option<&str>, value: f64) {
        let _ = write!(self.text, "{name}{suffix}");
        let pairs = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (k, v)) in pairs.enumerate() {
            let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = write!(self.text, "{}{k}=\"{v}\"", if i == 0 { "{" } else { "," });
        }
        if !labels.is_empty() || le.is_some() {
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_written_with_cumulative_buckets_and_escaped_labels() {
        let mut e = Exposition::default();
        e.family(&Family { name: "x_seconds", kind: Kind::Histogram, help: "How long x took." });
        let h = BucketCounts { bounds: &[0.5, 1.0], cumulative: vec![1, 3, 4], count: 4, sum: 2.5 };
        e.histogram("x_seconds", &[("cell", "a\"b")], &h);
        assert_eq!(
            e.into_text(),
            "# HELP x_seconds How long x took.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{cell=\"a\\\"b\",le=\"0.5\"} 1\n\
             x_seconds_bucket{cell=\"a\\\"b\",le=\"1\"} 3\n\
             x_seconds_bucket{cell=\"a\\\"b\",le=\"+Inf\"} 4\n\
             x_seconds_sum{cell=\"a\\\"b\"} 2.5\n\
             x_seconds_count{cell=\"a\\\"b\"} 4\n"
        );
    }
}
