//! A metric family as data: `/metrics` (the API) writes it as Prometheus text and the OTLP
//! exporter sends it as a cumulative sum or a gauge, so the two never disagree on a name, a
//! label or a value.

use std::fmt::Write as _;

/// A Prometheus label value, escaped.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `# HELP` and `# TYPE` lines.
pub fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// What a family's values are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows from the daemon's start (OTLP: a cumulative, monotonic sum).
    Counter,
    /// A level now.
    Gauge,
}

/// One metric with its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The Prometheus name (`_total` on counters, the unit spelled out).
    pub name: &'static str,
    /// The OpenTelemetry name: dotted, the unit apart. The OpenTelemetry-to-Prometheus name
    /// translation (dots to underscores, the unit's word, `_total`) gives back `name`.
    pub otel_name: &'static str,
    /// UCUM unit: `J`, `g`, `W`, or a count's annotation (`{request}`).
    pub unit: String,
    pub help: &'static str,
    pub kind: Kind,
    /// Whole counts: sent as integers over OTLP.
    pub integer: bool,
    pub points: Vec<Point>,
}

/// One series: its labels (OTLP attributes), in order, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Family {
    /// A family with no series yet.
    pub fn new(
        (name, otel_name, unit): (&'static str, &'static str, &str),
        help: &'static str,
        kind: Kind,
    ) -> Self {
        Self {
            name,
            otel_name,
            unit: unit.to_owned(),
            help,
            kind,
            integer: false,
            points: Vec::new(),
        }
    }

    /// Whole counts (requests, tokens): sent as integers over OTLP.
    #[must_use]
    pub fn whole(mut self) -> Self {
        self.integer = true;
        self
    }

    /// Adds a series.
    pub fn point(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.points.push(Point { labels, value });
    }

    /// Prometheus text: `# HELP`, `# TYPE`, then a line per series.
    pub fn write(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        head(out, self.name, kind, self.help);
        for p in &self.points {
            out.push_str(self.name);
            if !p.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in p.labels.iter().enumerate() {
                    let comma = if i == 0 { "" } else { "," };
                    let _ = write!(out, "{comma}{k}=\"{}\"", label(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", p.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Family, Kind};

    #[test]
    fn prometheus_text_escapes_labels_and_leaves_out_empty_braces() {
        let mut f = Family::new(
            ("tracer_x_total", "tracer.x", "{request}"),
            "Xs.",
            Kind::Counter,
        )
        .whole();
        f.point(vec![("service", "a\"b".into()), ("model", "m".into())], 3.0);
        f.point(Vec::new(), 0.5);
        let mut out = String::new();
        f.write(&mut out);
        assert_eq!(
            out,
            "# HELP tracer_x_total Xs.\n# TYPE tracer_x_total counter\n\
             tracer_x_total{service=\"a\\\"b\",model=\"m\"} 3\ntracer_x_total 0.5\n"
        );
        assert!(f.integer);
    }
}
