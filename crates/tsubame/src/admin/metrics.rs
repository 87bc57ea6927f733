//! `GET /metrics`: the Prometheus text format (version 0.0.4), from the counters the
//! event loops, the spool and the dispatcher keep. Recipient counts are per recipient
//! (a message to three addresses is received three times), labelled by the route that
//! chose the upstream (`1`, `2`, … in config order, or `default`) and the upstream.

use std::time::SystemTime;

use tsubame_metrics::{Exposition, Kind};
use tsubame_relay::delivery_log::EventKind;

use super::Sources;

/// The families of the recipient events, by event: name and help.
const EVENT_FAMILIES: [(EventKind, &str, &str); 5] = [
    (
        EventKind::Received,
        "tsubame_received_total",
        "Recipients of accepted messages and of the bounces tsubame made, queued for delivery.",
    ),
    (
        EventKind::Delivered,
        "tsubame_delivered_total",
        "Recipients the upstream accepted.",
    ),
    (
        EventKind::Deferred,
        "tsubame_deferred_total",
        "Delivery attempts that failed temporarily (tried again later).",
    ),
    (
        EventKind::Bounced,
        "tsubame_bounced_total",
        "Recipients that failed permanently; a bounce went to the sender.",
    ),
    (
        EventKind::Expired,
        "tsubame_expired_total",
        "Recipients still undelivered at the maximum queue time; bounced.",
    ),
];

/// A counter family split by one label: name, help, label, and each value's count.
type LabelledCounter<'a> = (&'a str, &'a str, &'a str, [(&'a str, f64); 2]);

pub(super) fn render(sources: &Sources) -> String {
    let mut out = Exposition::default();
    let events = sources.relay.events();
    for (kind, name, help) in EVENT_FAMILIES {
        out.family(name, Kind::Counter, help);
        for (event, route, upstream, count) in &events {
            if *event == kind {
                let route = route.text();
                out.sample(
                    name,
                    &[("route", &route), ("upstream", upstream)],
                    *count as f64,
                );
            }
        }
    }

    let queue = sources.relay.queue();
    out.family(
        "tsubame_queue_messages",
        Kind::Gauge,
        "Messages in the delivery queue (not yet finished).",
    );
    out.sample("tsubame_queue_messages", &[], queue.messages as f64);
    out.family(
        "tsubame_queue_held_messages",
        Kind::Gauge,
        "Messages on hold (tsubame queue hold).",
    );
    out.sample(
        "tsubame_queue_held_messages",
        &[],
        queue.held_messages as f64,
    );
    out.family(
        "tsubame_queue_recipients",
        Kind::Gauge,
        "Queued recipients by state.",
    );
    for (state, value) in [
        ("ready", queue.ready),
        ("in_flight", queue.in_flight),
        ("deferred", queue.deferred),
        ("held", queue.held),
    ] {
        out.sample(
            "tsubame_queue_recipients",
            &[("state", state)],
            value as f64,
        );
    }

    out.family(
        "tsubame_spool_bytes",
        Kind::Gauge,
        "Disk space the spool's segment files occupy.",
    );
    out.family(
        "tsubame_spool_segments",
        Kind::Gauge,
        "Segment files in the spool directory.",
    );
    match sources.spool.disk_usage() {
        Ok(usage) => {
            out.sample("tsubame_spool_bytes", &[], usage.bytes as f64);
            out.sample("tsubame_spool_segments", &[], usage.segments as f64);
        }
        Err(error) => tracing::warn!(%error, "metrics: cannot read the spool directory"),
    }
    out.family(
        "tsubame_spool_sync_seconds",
        Kind::Histogram,
        "Time of each group commit's sync to disk (msync), which every 250 waits for.",
    );
    out.histogram(
        "tsubame_spool_sync_seconds",
        &[],
        &sources.spool.sync_latency(),
    );
    out.family(
        "tsubame_delivery_latency_seconds",
        Kind::Histogram,
        "From a message's receipt to its delivery, per delivered recipient.",
    );
    out.histogram(
        "tsubame_delivery_latency_seconds",
        &[],
        &sources.relay.delivery_latency(),
    );

    let server = sources.server.counters();
    let load = |counter: &std::sync::atomic::AtomicU64| {
        counter.load(std::sync::atomic::Ordering::Relaxed) as f64
    };
    out.family(
        "tsubame_connections_open",
        Kind::Gauge,
        "SMTP connections open now.",
    );
    out.sample(
        "tsubame_connections_open",
        &[],
        sources.server.open_connections() as f64,
    );
    // Counters with one label that splits them.
    let labelled: [LabelledCounter<'_>; 3] = [
        (
            "tsubame_connections_total",
            "SMTP connections admitted, and refused by max_connections or max_connections_per_ip.",
            "result",
            [
                ("accepted", load(&server.connections_accepted)),
                ("refused", load(&server.connections_refused)),
            ],
        ),
        (
            "tsubame_tls_handshakes_total",
            "TLS handshakes on the listeners (STARTTLS and implicit TLS), completed or failed.",
            "result",
            [
                ("ok", load(&server.tls_handshakes)),
                ("failed", load(&server.tls_handshake_failures)),
            ],
        ),
        (
            "tsubame_login_failures_total",
            "SMTP AUTH logins refused: a wrong password or unknown user, or a locked-out address or account.",
            "reason",
            [
                ("invalid", load(&server.login_failures)),
                ("locked_out", load(&server.login_lockouts)),
            ],
        ),
    ];
    for (name, help, label, values) in labelled {
        out.family(name, Kind::Counter, help);
        for (value, count) in values {
            out.sample(name, &[(label, value)], count);
        }
    }
    out.family(
        "tsubame_start_time_seconds",
        Kind::Gauge,
        "When this process started, in seconds since the Unix epoch.",
    );
    let started = sources
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64().floor());
    out.sample("tsubame_start_time_seconds", &[], started);
    out.finish()
}
