//! Prometheus text exposition of both sides' connection figures, through prometheus-client
//! (the only module that knows it). Figures are read at scrape time from the connections'
//! statuses and live counters, so nothing is kept twice.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::status::{now_ms, ConnectionStatus, Health};

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A latency histogram of one connection, with [`LATENCY_BUCKETS`].
#[derive(Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS))
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// A counter series: name (without `_total`), help text, and how to read it.
type CounterSeries = (&'static str, &'static str, fn(&Health) -> u64);

/// A histogram series: name, help text, and which histogram of a connection's health.
type HistogramSeries = (&'static str, &'static str, fn(&Health) -> &Histogram);

const COUNTERS: [CounterSeries; 9] = [
    ("relay_messages_sent", "Messages handed to the peer.", |h| {
        Health::get(&h.sent)
    }),
    ("relay_messages_received", "Messages received from the peer.", |h| {
        Health::get(&h.received)
    }),
    ("relay_messages_delivered", "Messages delivered to the webhook.", |h| {
        Health::get(&h.delivered)
    }),
    ("relay_messages_dead_lettered", "Messages dead-lettered.", |h| {
        Health::get(&h.dead_lettered)
    }),
    ("relay_failures", "Failed delivery or transport attempts.", |h| {
        Health::get(&h.failures)
    }),
    ("relay_reconnects", "Reconnects to the peer.", |h| {
        Health::get(&h.reconnects)
    }),
    ("relay_bytes_sent", "Payload bytes handed to the peer.", |h| {
        Health::get(&h.bytes_sent)
    }),
    ("relay_bytes_received", "Payload bytes received from the peer.", |h| {
        Health::get(&h.bytes_received)
    }),
    (
        "relay_bytes_delivered",
        "Payload bytes delivered to the webhook.",
        |h| Health::get(&h.bytes_delivered),
    ),
];

const HISTOGRAMS: [HistogramSeries; 2] = [
    (
        "relay_peer_round_trip_seconds",
        "Round trip of exchanges with the peer that did not wait (pushes, answered polls).",
        |h| &h.round_trip,
    ),
    ("relay_webhook_seconds", "Duration of webhook requests.", |h| {
        &h.webhook_latency
    }),
];

/// What the side's store did, process-wide.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFigures {
    /// Group commits made durable (each one `fdatasync` of the log, at least).
    pub commits: u64,
    /// `fdatasync`/`fsync` calls they took: the log, new files, directories.
    pub file_syncs: u64,
}

/// One scrape's view of every connection of a side.
#[derive(Debug)]
struct Scrape {
    role: &'static str,
    statuses: Vec<ConnectionStatus>,
    healths: Vec<Option<Arc<Health>>>,
    store: StoreFigures,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = encoder.encode_descriptor("relay_info", "Relay build and role.", None, MetricType::Gauge)?;
        encode_const_gauge(
            info,
            [("role", self.role), ("version", env!("CARGO_PKG_VERSION"))],
            1i64,
        )?;

        let now = now_ms();
        let queue_series: [(&str, &str); 4] = [
            ("relay_queue_depth", "Messages queued."),
            ("relay_queue_bytes", "Payload bytes queued."),
            ("relay_queue_oldest_age_seconds", "Age of the oldest queued message."),
            ("relay_dead_letters", "Dead letters kept."),
        ];
        for (name, help) in queue_series {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &self.statuses {
                for (direction, q) in [("outbound", &s.outbound), ("inbound", &s.inbound)] {
                    let labels = [("connection", s.name.as_str()), ("direction", direction)];
                    let sample = family.encode_family(&labels)?;
                    match name {
                        "relay_queue_depth" => ConstGauge::new(q.depth).encode(sample)?,
                        "relay_queue_bytes" => ConstGauge::new(q.bytes).encode(sample)?,
                        "relay_queue_oldest_age_seconds" => {
                            let age = q
                                .oldest_enqueued_ms
                                .map(|t| now.saturating_sub(t) as f64 / 1000.0)
                                .unwrap_or(0.0);
                            ConstGauge::new(age).encode(sample)?
                        }
                        _ => ConstGauge::new(q.dead_letters).encode(sample)?,
                    }
                }
            }
        }

        for (name, help, get) in COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (s, h) in self.statuses.iter().zip(&self.healths) {
                let value = h.as_deref().map(get).unwrap_or(0);
                ConstCounter::new(value).encode(family.encode_family(&[("connection", s.name.as_str())])?)?;
            }
        }

        for (name, help, get) in HISTOGRAMS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (s, h) in self.statuses.iter().zip(&self.healths) {
                let Some(h) = h else { continue };
                get(h)
                    .0
                    .encode(family.encode_family(&[("connection", s.name.as_str())])?)?;
            }
        }

        let store: [(&str, &str, u64); 2] = [
            (
                "relay_store_syncs",
                "Group commits made durable: one fdatasync of the store's log each, shared by every acknowledgement waiting on it.",
                self.store.commits,
            ),
            (
                "relay_store_file_syncs",
                "fdatasync and fsync calls of the store: its log, files it created, directories.",
                self.store.file_syncs,
            ),
        ];
        for (name, help, value) in store {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }

        let mut family = encoder.encode_descriptor(
            "relay_last_contact_timestamp_seconds",
            "Last exchange with the peer.",
            None,
            MetricType::Gauge,
        )?;
        for s in &self.statuses {
            let at = s.last_contact_ms.unwrap_or(0) as f64 / 1000.0;
            ConstGauge::new(at).encode(family.encode_family(&[("connection", s.name.as_str())])?)?;
        }
        Ok(())
    }
}

fn encode_const_gauge(
    mut family: prometheus_client::encoding::MetricEncoder<'_>,
    labels: [(&str, &str); 2],
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(family.encode_family(&labels)?)
}

/// Renders every connection's queue and delivery figures for `role` ("node" or "agent"), and
/// its store's, in the Prometheus text format (0.0.4).
pub fn render(
    role: &'static str,
    statuses: &[ConnectionStatus],
    healths: &[Option<Arc<Health>>],
    store: StoreFigures,
) -> String {
    encode(Box::new(Scrape {
        role,
        statuses: statuses.to_vec(),
        healths: healths.to_vec(),
        store,
    }))
}

/// One collector's series in the Prometheus text format.
fn encode(collector: Box<dyn Collector>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(collector);
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would leave a partial scrape,
    // which Prometheus refuses as a whole, so it is not hidden either.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

/// A local listener's refusals of what browsers sent, by reason.
#[derive(Debug)]
struct Refusals {
    listener: &'static str,
    counts: Vec<(&'static str, u64)>,
}

impl Collector for Refusals {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "relay_local_refusals",
            "Requests a local listener refused: a host it does not answer to, or a browser request from another site.",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in &self.counts {
            let labels = [("listener", self.listener), ("reason", *reason)];
            ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Renders the refusal counts (`reason` label, count) of the local `listener` ("api" or
/// "intake"), to follow [`render`] in the same scrape.
pub fn render_refusals(listener: &'static str, counts: &[(&'static str, u64)]) -> String {
    encode(Box::new(Refusals {
        listener,
        counts: counts.to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QueueStats;

    fn status(name: &str) -> ConnectionStatus {
        ConnectionStatus {
            name: name.into(),
            state: "active".into(),
            local: "pub".into(),
            remote: "priv".into(),
            description: String::new(),
            mode: "script".into(),
            project: String::new(),
            deliver_to: None,
            last_contact_ms: Some(1_500),
            outbound: QueueStats {
                depth: 4,
                bytes: 40,
                ..QueueStats::default()
            },
            inbound: QueueStats::default(),
            last_error: None,
            invitation_expires_at: None,
            trust: None,
            route: None,
            recent_dead_letters: Vec::new(),
            holds: Vec::new(),
            sync: None,
        }
    }

    #[test]
    fn series_keep_their_names_and_labels() {
        let health = Arc::new(Health::default());
        Health::add(&health.delivered, 2);
        Health::add(&health.bytes_delivered, 4);
        health.webhook_latency.observe(Duration::from_millis(3));
        health.round_trip.observe(Duration::from_secs(9));
        let store = StoreFigures {
            commits: 7,
            file_syncs: 9,
        };
        let text = render("agent", &[status("c"), status("we\"ird")], &[Some(health), None], store);
        for line in [
            "# TYPE relay_info gauge",
            "relay_info{role=\"agent\",version=\"",
            "# TYPE relay_queue_depth gauge",
            "relay_queue_depth{connection=\"c\",direction=\"outbound\"} 4\n",
            "relay_queue_bytes{connection=\"c\",direction=\"outbound\"} 40\n",
            "relay_queue_oldest_age_seconds{connection=\"c\",direction=\"inbound\"} 0",
            "relay_dead_letters{connection=\"c\",direction=\"inbound\"} 0\n",
            "# HELP relay_messages_delivered_total Messages delivered to the webhook.\n",
            "# TYPE relay_messages_delivered_total counter\n",
            "relay_messages_delivered_total{connection=\"c\"} 2\n",
            "# TYPE relay_store_syncs_total counter\nrelay_store_syncs_total 7\n",
            "relay_store_file_syncs_total 9\n",
            "relay_bytes_delivered_total{connection=\"c\"} 4\n",
            "relay_messages_delivered_total{connection=\"we\\\"ird\"} 0\n",
            "# TYPE relay_webhook_seconds histogram",
            "relay_webhook_seconds_bucket{connection=\"c\",le=\"0.0025\"} 0\n",
            "relay_webhook_seconds_bucket{connection=\"c\",le=\"0.005\"} 1\n",
            "relay_webhook_seconds_count{connection=\"c\"} 1\n",
            "relay_peer_round_trip_seconds_bucket{connection=\"c\",le=\"+Inf\"} 1\n",
            "relay_last_contact_timestamp_seconds{connection=\"c\"} 1.5\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "the classic text format, not OpenMetrics");
    }

    #[test]
    fn refusals_by_reason() {
        let text = render_refusals("intake", &[("host", 3), ("cross_origin", 0)]);
        for line in [
            "# TYPE relay_local_refusals_total counter\n",
            "relay_local_refusals_total{listener=\"intake\",reason=\"host\"} 3\n",
            "relay_local_refusals_total{listener=\"intake\",reason=\"cross_origin\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }
}
