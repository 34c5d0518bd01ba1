//! Prometheus metrics (`GET /metrics` with any valid token, OpenMetrics text): requests and
//! bytes by the server's counters; snapshots, newest snapshot age, trash and job results of the
//! repositories the token opens, and the role, lag and journal of its shadow streams, computed at
//! each scrape.

use crate::api::Hosted;
use kura_store::Kind;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The server's running counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    bytes_received: Counter,
    bytes_sent: Counter,
    auth_failures: Counter,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, method: &str, status: u16, received: u64, sent: u64) {
        self.requests.get_or_create(&vec![("method".into(), method.into()), ("status".into(), status.to_string())]).inc();
        self.bytes_received.inc_by(received);
        self.bytes_sent.inc_by(sent);
    }

    /// Counts a request with an unknown or missing token.
    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    /// Renders every metric now.
    pub fn render(&self, repos: &HashMap<String, Arc<Hosted>>, streams: &HashMap<String, Arc<kura_shadow::Stream>>) -> String {
        let mut reg = <Registry>::default();
        reg.register("kura_http_requests", "Requests answered, by method and status", self.requests.clone());
        reg.register("kura_http_received_bytes", "Request body bytes received", self.bytes_received.clone());
        reg.register("kura_http_sent_bytes", "Response body bytes sent", self.bytes_sent.clone());
        reg.register("kura_auth_failures", "Requests refused for an unknown or missing token", self.auth_failures.clone());
        let snapshots = Family::<Labels, Gauge>::default();
        let newest_age = Family::<Labels, FloatGauge>::default();
        let trash = Family::<Labels, Gauge>::default();
        let job_ok = Family::<Labels, Gauge>::default();
        let job_success = Family::<Labels, FloatGauge>::default();
        let job_runs = Family::<Labels, Gauge>::default();
        let job_failures = Family::<Labels, Gauge>::default();
        let now = std::time::SystemTime::now();
        for (name, h) in repos {
            let repo = vec![("repository".to_string(), name.clone())];
            // A store that cannot be listed now leaves its gauges out, which alerting sees.
            if let Ok(listed) = h.store.list(Kind::Snapshot) {
                snapshots.get_or_create(&repo).set(listed.len() as i64);
                if let Some(t) = listed.iter().filter_map(|l| l.modified).max() {
                    newest_age.get_or_create(&repo).set(now.duration_since(t).map(|d| d.as_secs_f64()).unwrap_or(0.0));
                }
            }
            if let Ok(listed) = h.store.list(Kind::Trash) {
                trash.get_or_create(&repo).set(listed.len() as i64);
            }
            if let Ok(jobs) = h.jobs.status.lock() {
                for (job, st) in jobs.iter() {
                    let l = vec![("repository".to_string(), name.clone()), ("job".to_string(), job.to_string())];
                    if let Some(ok) = st.last_ok {
                        job_ok.get_or_create(&l).set(i64::from(ok));
                    }
                    if let Some(t) = st.last_success.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
                        job_success.get_or_create(&l).set(t.as_millisecond() as f64 / 1000.0);
                    }
                    job_runs.get_or_create(&l).set(st.runs as i64);
                    job_failures.get_or_create(&l).set(st.failures as i64);
                }
            }
        }
        reg.register("kura_repository_snapshots", "Snapshots in the repository", snapshots);
        reg.register("kura_repository_newest_snapshot_age_seconds", "Seconds since the newest snapshot was received", newest_age);
        reg.register("kura_repository_trash_snapshots", "Deleted snapshots still within the undelete window", trash);
        reg.register("kura_job_last_ok", "1 when the job's last run succeeded, 0 when it failed", job_ok);
        reg.register("kura_job_last_success_timestamp_seconds", "When the job last succeeded (Unix time)", job_success);
        reg.register("kura_job_runs", "Runs of the job since the server started", job_runs);
        reg.register("kura_job_failures", "Failed runs of the job since the server started", job_failures);
        shadow(&mut reg, streams);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }
}

/// The shadow streams' figures: the same as `kura shadow status`.
fn shadow(reg: &mut Registry, streams: &HashMap<String, Arc<kura_shadow::Stream>>) {
    let now = kura_shadow::now_ns();
    let age = |ns: i64| if ns > 0 { now.saturating_sub(ns) as f64 / 1e9 } else { f64::NAN };
    let figures = |s: &kura_shadow::StreamStatus| -> Vec<(&'static str, &'static str, f64)> {
        vec![
            ("kura_shadow_epoch", "The stream's failover epoch", s.epoch as f64),
            ("kura_shadow_primary", "1 once the standby was promoted (its mirror is the primary copy)", f64::from(u8::from(s.role == "primary"))),
            ("kura_shadow_head_record", "Newest record in the journal", s.head as f64),
            ("kura_shadow_applied_record", "Newest record applied to the mirror", s.applied as f64),
            ("kura_shadow_lag_records", "Records received and not yet applied to the mirror", s.head.saturating_sub(s.applied) as f64),
            ("kura_shadow_lag_seconds", "Seconds the oldest record not yet applied has waited (0 when none)", s.lag_secs),
            ("kura_shadow_last_contact_age_seconds", "Seconds since the primary last pushed or sent its heartbeat", age(s.last_contact_ns)),
            ("kura_shadow_held", "1 while the breaker holds a mass deletion", f64::from(u8::from(s.held.is_some()))),
            ("kura_shadow_journal_bytes", "Bytes of journal segments and packs", s.journal_bytes as f64),
            ("kura_shadow_index_in_memory", "Chunk index entries the standby holds in memory", s.index_in_memory as f64),
            ("kura_shadow_records", "Records kept in the window", s.records as f64),
            ("kura_shadow_window_age_seconds", "Age of the oldest moment the journal can restore", age(s.oldest_time_ns)),
            ("kura_shadow_branches", "Branches kept from fenced primaries", s.branches.len() as f64),
        ]
    };
    let mut families: Vec<(&'static str, &'static str, Family<Labels, FloatGauge>)> = Vec::new();
    for (name, s) in streams {
        for (i, (metric, help, v)) in figures(&s.status(false)).into_iter().enumerate() {
            if families.len() <= i {
                families.push((metric, help, Family::default()));
            }
            families[i].2.get_or_create(&vec![("stream".to_string(), name.clone())]).set(v);
        }
    }
    for (metric, help, fam) in families {
        reg.register(metric, help, fam);
    }
}
