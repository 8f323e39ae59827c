//! `/stats/prometheus`, parsed.

use std::collections::BTreeMap;

/// One line of Prometheus text: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed `/stats/prometheus`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus text exposition (comments and unparsable lines skipped).
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(parse_sample)
                .collect(),
        }
    }

    /// The value of `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The sum over samples of `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            // Not `sum()`: over no samples it gives -0.0, which reads oddly in a failure message.
            .fold(0.0, |total, v| total + v)
    }

    /// Samples whose name starts with `prefix`, as text lines (for failure messages).
    pub fn dump(&self, prefix: &str) -> String {
        self.samples
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                line.get(..open)?,
                parse_labels(line.get(open + 1..close)?)?,
                line.get(close + 1..)?,
            )
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // Values are quoted with `\"` and `\\` escapes.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(match e {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                other => value.push(other),
            }
        }
        labels.insert(key.trim().trim_start_matches(',').trim().to_string(), value);
        rest = after.get(end? + 1..)?.trim_start_matches(',').trim();
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# TYPE circuit_breaker_calls_total counter\n\
                    circuit_breaker_calls_total{upstream=\"content\",result=\"failure\"} 3\n\
                    circuit_breaker_untracked_calls_total 7\n\
                    envoy_x{a=\"q\\\"uote\"} 1.5\n";
        let m = Metrics::parse(text);
        assert_eq!(
            m.value(
                "circuit_breaker_calls_total",
                &[("upstream", "content"), ("result", "failure")]
            ),
            Some(3.0)
        );
        assert_eq!(
            m.value("circuit_breaker_calls_total", &[("upstream", "content")]),
            None
        );
        assert_eq!(
            m.sum("circuit_breaker_calls_total", &[("upstream", "content")]),
            3.0
        );
        assert_eq!(
            m.value("circuit_breaker_untracked_calls_total", &[]),
            Some(7.0)
        );
        assert_eq!(m.value("envoy_x", &[("a", "q\"uote")]), Some(1.5));
    }
}
