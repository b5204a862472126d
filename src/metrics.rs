//! Prometheus text exposition of both sides' connection counters.

use std::fmt::Write;
use std::sync::Arc;

use crate::status::{now_ms, ConnectionStatus, Health, Histogram, LATENCY_BUCKETS};

/// A counter series: name, help text, and how to read it from a connection's health.
type Counter = (&'static str, &'static str, fn(&Health) -> u64);

/// A histogram series: name, help text, and which histogram of a connection's health.
type HistogramSeries = (&'static str, &'static str, fn(&Health) -> &Histogram);

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every connection's queue and delivery figures for `role` ("node" or "agent").
pub fn render(role: &str, statuses: &[ConnectionStatus], healths: &[Option<Arc<Health>>]) -> String {
    let mut out = String::new();
    let now = now_ms();
    let _ = writeln!(out, "# HELP relay_info Relay build and role.\n# TYPE relay_info gauge");
    let _ = writeln!(
        out,
        "relay_info{{role=\"{role}\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let series: [(&str, &str, &str); 4] = [
        ("relay_queue_depth", "gauge", "Messages queued."),
        ("relay_queue_bytes", "gauge", "Payload bytes queued."),
        (
            "relay_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest queued message.",
        ),
        ("relay_dead_letters", "gauge", "Dead letters kept."),
    ];
    for (name, kind, help) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in statuses {
            for (dir, q) in [("outbound", &s.outbound), ("inbound", &s.inbound)] {
                let value = match name {
                    "relay_queue_depth" => q.depth as f64,
                    "relay_queue_bytes" => q.bytes as f64,
                    "relay_queue_oldest_age_seconds" => q
                        .oldest_enqueued_ms
                        .map(|t| now.saturating_sub(t) as f64 / 1000.0)
                        .unwrap_or(0.0),
                    _ => q.dead_letters as f64,
                };
                let _ = writeln!(
                    out,
                    "{name}{{connection=\"{}\",direction=\"{dir}\"}} {value}",
                    escape(&s.name)
                );
            }
        }
    }
    let counters: [Counter; 9] = [
        ("relay_messages_sent_total", "Messages handed to the peer.", |h| {
            Health::get(&h.sent)
        }),
        (
            "relay_messages_received_total",
            "Messages received from the peer.",
            |h| Health::get(&h.received),
        ),
        (
            "relay_messages_delivered_total",
            "Messages delivered to the webhook.",
            |h| Health::get(&h.delivered),
        ),
        ("relay_messages_dead_lettered_total", "Messages dead-lettered.", |h| {
            Health::get(&h.dead_lettered)
        }),
        ("relay_failures_total", "Failed delivery or transport attempts.", |h| {
            Health::get(&h.failures)
        }),
        ("relay_reconnects_total", "Reconnects to the peer.", |h| {
            Health::get(&h.reconnects)
        }),
        ("relay_bytes_sent_total", "Payload bytes handed to the peer.", |h| {
            Health::get(&h.bytes_sent)
        }),
        (
            "relay_bytes_received_total",
            "Payload bytes received from the peer.",
            |h| Health::get(&h.bytes_received),
        ),
        (
            "relay_bytes_delivered_total",
            "Payload bytes delivered to the webhook.",
            |h| Health::get(&h.bytes_delivered),
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (s, h) in statuses.iter().zip(healths) {
            let v = h.as_ref().map(|h| get(h)).unwrap_or(0);
            let _ = writeln!(out, "{name}{{connection=\"{}\"}} {v}", escape(&s.name));
        }
    }
    let histograms: [HistogramSeries; 2] = [
        (
            "relay_peer_round_trip_seconds",
            "Round trip of exchanges with the peer that did not wait (pushes, answered polls).",
            |h| &h.round_trip,
        ),
        ("relay_webhook_seconds", "Duration of webhook requests.", |h| {
            &h.webhook_latency
        }),
    ];
    for (name, help, get) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (s, h) in statuses.iter().zip(healths) {
            let Some(h) = h else { continue };
            let conn = escape(&s.name);
            let (cumulative, count, sum) = get(h).snapshot();
            for (le, c) in LATENCY_BUCKETS.iter().zip(&cumulative) {
                let _ = writeln!(out, "{name}_bucket{{connection=\"{conn}\",le=\"{le}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{connection=\"{conn}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{connection=\"{conn}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{connection=\"{conn}\"}} {count}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP relay_last_contact_timestamp_seconds Last exchange with the peer.\n# TYPE relay_last_contact_timestamp_seconds gauge"
    );
    for s in statuses {
        let v = s.last_contact_ms.unwrap_or(0) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "relay_last_contact_timestamp_seconds{{connection=\"{}\"}} {v}",
            escape(&s.name)
        );
    }
    out
}
