//! Prometheus metrics, for `GET /metrics`: the calls this node served and made, their timings
//! and tokens, its models' queues, its peers by path, hole punches, relays, the DHT, and
//! (through `libp2p-metrics`, under `libp2p_`) the swarm's own events and bytes in and out.
//!
//! Label sets stay bounded: model names (a served call's only when this node hosts the model,
//! a made call's at most [`MAX_MODEL_LABELS`] distinct names, then `other`), outcomes, error
//! codes and paths. No peer ids, no prompts.
//!
//! [`Metrics`] holds the families; its clones share them. The registry they live in is built
//! once, when the node starts ([`Metrics::register`]), and read by each scrape.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Most distinct model names a made call's metrics carry; later names count as `other`.
pub const MAX_MODEL_LABELS: usize = 64;

/// A call by model and outcome: `answered`, `refused` (with the error code that said why),
/// `failed` (with its code), or `cancelled` (the caller went away).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub model: String,
    pub outcome: String,
    pub code: String,
}

/// A call this node made, with the path it took (`local`, `direct`, `hole-punched`,
/// `relayed`, or `none` when no provider answered).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MadeLabels {
    pub model: String,
    pub outcome: String,
    pub code: String,
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Relay reservations and circuits, by role: `client` (this node reserved or dialled through
/// a relay) or `relay` (this node relays for others).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    pub role: String,
    pub event: String,
}

/// How a call ended, for its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    /// Refused before it ran: by policy (`unauthorized`), by load (`overloaded`), as a bad
    /// request, or for a model not hosted (`unknown_model`).
    Refused(&'static str),
    /// It ran, or was routed, and failed (`deadline_exceeded`, `internal`, ...).
    Failed(&'static str),
    /// The caller went away.
    Cancelled,
}

impl Outcome {
    /// The outcome an error with `code` (an `ErrorCode`'s wire name) stands for.
    pub fn of_code(code: &'static str) -> Outcome {
        match code {
            "unauthorized" | "overloaded" | "bad_request" | "unknown_model" => {
                Outcome::Refused(code)
            }
            _ => Outcome::Failed(code),
        }
    }

    fn labels(self) -> (&'static str, String) {
        match self {
            Outcome::Answered => ("answered", String::new()),
            Outcome::Refused(code) => ("refused", code.to_string()),
            Outcome::Failed(code) => ("failed", code.to_string()),
            Outcome::Cancelled => ("cancelled", String::new()),
        }
    }
}

/// Time to first output and whole-call time buckets, in seconds: 5 ms to about 80 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

type Histograms = Family<ModelLabel, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct Metrics {
    served: Family<CallLabels, Counter>,
    made: Family<MadeLabels, Counter>,
    first_output: Histograms,
    call_time: Histograms,
    made_first_frame: Histograms,
    tokens: Family<ModelLabel, Counter>,
    queued: Family<ModelLabel, Gauge>,
    busy: Family<ModelLabel, Gauge>,
    peers: Family<PathLabel, Gauge>,
    hole_punches: Family<ResultLabel, Counter>,
    relay: Family<RelayLabels, Counter>,
    relays_held: Gauge,
    dht_records: Family<PathLabel, Gauge>,
    catalogs_served: Counter,
    connections_trimmed: Counter,
    dht_lookup_requests: Histogram,
    /// The model names made calls were counted under.
    made_models: Arc<Mutex<HashSet<String>>>,
    /// Served calls by the second, for the last minute (`mesh status`).
    recent: Arc<Mutex<Recent>>,
}

/// Served calls in the last minute, by outcome (`GET /v1/mesh/status`, `mesh status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastMinute {
    pub answered: u64,
    pub refused: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// Served calls counted by the second: at most 60 seconds kept.
#[derive(Debug)]
struct Recent {
    start: Instant,
    /// (second since `start`, counts that second), oldest first.
    seconds: VecDeque<(u64, LastMinute)>,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            start: Instant::now(),
            seconds: VecDeque::new(),
        }
    }
}

impl Recent {
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    fn count(&mut self, outcome: Outcome, now: Instant) {
        let second = self.second(now);
        if self.seconds.back().is_none_or(|(s, _)| *s != second) {
            self.seconds.push_back((second, LastMinute::default()));
        }
        while self.seconds.len() > 60 {
            self.seconds.pop_front();
        }
        let (_, counts) = self.seconds.back_mut().expect("pushed above");
        match outcome {
            Outcome::Answered => counts.answered += 1,
            Outcome::Refused(_) => counts.refused += 1,
            Outcome::Failed(_) => counts.failed += 1,
            Outcome::Cancelled => counts.cancelled += 1,
        }
    }

    fn last_minute(&self, now: Instant) -> LastMinute {
        let second = self.second(now);
        let mut total = LastMinute::default();
        for (_, c) in self.seconds.iter().filter(|(s, _)| s + 60 > second) {
            total.answered += c.answered;
            total.refused += c.refused;
            total.failed += c.failed;
            total.cancelled += c.cancelled;
        }
        total
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let histograms = || Histograms::new_with_constructor(seconds_histogram as fn() -> _);
        Metrics {
            served: Family::default(),
            made: Family::default(),
            first_output: histograms(),
            call_time: histograms(),
            made_first_frame: histograms(),
            tokens: Family::default(),
            queued: Family::default(),
            busy: Family::default(),
            peers: Family::default(),
            hole_punches: Family::default(),
            relay: Family::default(),
            relays_held: Gauge::default(),
            dht_records: Family::default(),
            catalogs_served: Counter::default(),
            connections_trimmed: Counter::default(),
            dht_lookup_requests: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            made_models: Arc::default(),
            recent: Arc::default(),
        }
    }
}

impl Metrics {
    /// Families registered under `mesh_` in `registry`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics::default();
        let r = registry.sub_registry_with_prefix("mesh");
        r.register(
            "calls_served",
            "Calls this node served, by model, outcome and error code",
            metrics.served.clone(),
        );
        r.register(
            "calls_made",
            "Calls made through this node's API and CLI, by model, outcome, error code and path",
            metrics.made.clone(),
        );
        r.register(
            "first_output_seconds",
            "Served calls: time from the request to the first output",
            metrics.first_output.clone(),
        );
        r.register(
            "call_seconds",
            "Served calls: time from the request to the end of the answer",
            metrics.call_time.clone(),
        );
        r.register(
            "made_first_frame_seconds",
            "Made calls: time until the provider's first frame, as this node measured it",
            metrics.made_first_frame.clone(),
        );
        r.register(
            "tokens_generated",
            "Tokens generated by the calls this node served",
            metrics.tokens.clone(),
        );
        r.register(
            "queued_calls",
            "Calls waiting for a slot, by hosted model",
            metrics.queued.clone(),
        );
        r.register(
            "busy_slots",
            "Slots computing a call, by hosted model",
            metrics.busy.clone(),
        );
        r.register(
            "peers",
            "Connected peers, by the best path to each: direct, hole-punched, relayed",
            metrics.peers.clone(),
        );
        r.register(
            "hole_punches",
            "DCUtR hole punches, by result",
            metrics.hole_punches.clone(),
        );
        r.register(
            "relay_events",
            "Relay reservations and circuits, by role (client or relay) and event",
            metrics.relay.clone(),
        );
        r.register(
            "relays_held",
            "Relays this node holds an accepted reservation with",
            metrics.relays_held.clone(),
        );
        r.register(
            "dht_records",
            "Provider records in this node's DHT store: own keys, remote records, remote addresses",
            metrics.dht_records.clone(),
        );
        r.register(
            "catalogs_served",
            "Signed catalogs this node sent to peers (/mesh/catalog/1)",
            metrics.catalogs_served.clone(),
        );
        r.register(
            "connections_trimmed",
            "Idle connections closed to keep the count under the high mark",
            metrics.connections_trimmed.clone(),
        );
        r.register(
            "dht_lookup_requests",
            "Provider lookups this node finished, by the Kademlia requests each sent",
            metrics.dht_lookup_requests.clone(),
        );
        metrics
    }

    /// A provider lookup ended after sending `requests` Kademlia requests.
    pub fn dht_lookup(&self, requests: u32) {
        self.dht_lookup_requests.observe(f64::from(requests));
    }

    /// `n` connections were closed for being past the high mark.
    pub fn connections_trimmed(&self, n: usize) {
        self.connections_trimmed.inc_by(n as u64);
    }

    /// A catalog was sent to a peer.
    pub fn catalog_served(&self) {
        self.catalogs_served.inc();
    }

    /// A call to hosted `model` ended as `outcome`; `model` is `None` when the request named a
    /// model this node does not host (counted as `other`).
    pub fn served(&self, model: Option<&str>, outcome: Outcome) {
        self.recent
            .lock()
            .expect("never poisoned: no panics while held")
            .count(outcome, Instant::now());
        let (outcome, code) = outcome.labels();
        self.served
            .get_or_create(&CallLabels {
                model: model.unwrap_or("other").to_string(),
                outcome: outcome.to_string(),
                code,
            })
            .inc();
    }

    /// The calls served in the last minute, by outcome.
    pub fn last_minute(&self) -> LastMinute {
        self.recent
            .lock()
            .expect("never poisoned: no panics while held")
            .last_minute(Instant::now())
    }

    /// A served call of hosted `model` answered: its timings and the tokens it generated.
    pub fn answered(&self, model: &str, first_output: Duration, total: Duration, tokens: u32) {
        let label = ModelLabel {
            model: model.to_string(),
        };
        self.first_output
            .get_or_create(&label)
            .observe(first_output.as_secs_f64());
        self.call_time
            .get_or_create(&label)
            .observe(total.as_secs_f64());
        self.tokens.get_or_create(&label).inc_by(u64::from(tokens));
    }

    /// The label a made call of `model` is counted under: its name while fewer than
    /// [`MAX_MODEL_LABELS`] names are in use, else `other`.
    fn made_model(&self, model: &str) -> String {
        let mut seen = self
            .made_models
            .lock()
            .expect("never poisoned: no panics while held");
        if seen.contains(model) || (seen.len() < MAX_MODEL_LABELS && seen.insert(model.into())) {
            model.to_string()
        } else {
            "other".into()
        }
    }

    /// A call this node made for `model` ended as `outcome` over `path`.
    pub fn made(&self, model: &str, outcome: Outcome, path: &str) {
        let (outcome, code) = outcome.labels();
        let model = self.made_model(model);
        self.made
            .get_or_create(&MadeLabels {
                model,
                outcome: outcome.to_string(),
                code,
                path: path.to_string(),
            })
            .inc();
    }

    /// A call this node made for `model` got its provider's first frame after `waited`.
    pub fn made_first_frame(&self, model: &str, waited: Duration) {
        let model = self.made_model(model);
        self.made_first_frame
            .get_or_create(&ModelLabel { model })
            .observe(waited.as_secs_f64());
    }

    /// What hosted `model`'s queue holds now: calls waiting and slots computing.
    pub fn model_load(&self, model: &str, queued: u32, busy: u32) {
        let label = ModelLabel {
            model: model.to_string(),
        };
        self.queued.get_or_create(&label).set(i64::from(queued));
        self.busy.get_or_create(&label).set(i64::from(busy));
    }

    /// The peers connected now, by the best path to each.
    pub fn peers_by_path(&self, by_path: &[(&str, usize)]) {
        for (path, n) in by_path {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            self.peers
                .get_or_create(&PathLabel {
                    path: (*path).to_string(),
                })
                .set(n);
        }
    }

    /// A hole punch ended.
    pub fn hole_punch(&self, succeeded: bool) {
        let result = if succeeded { "success" } else { "failure" };
        self.hole_punches
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// A relay event: `role` is `client` or `relay`, `event` what happened
    /// (`reservation_accepted`, `circuit_opened`, ...).
    pub fn relay(&self, role: &'static str, event: &'static str) {
        self.relay
            .get_or_create(&RelayLabels {
                role: role.into(),
                event: event.into(),
            })
            .inc();
    }

    /// The relays held now, and the DHT store's records.
    pub fn network(&self, relays_held: usize, dht: &crate::network::DhtStore) {
        self.relays_held
            .set(i64::try_from(relays_held).unwrap_or(i64::MAX));
        for (kind, n) in [
            ("own_keys", dht.own_keys),
            ("remote_records", dht.remote_records),
            ("remote_addresses", dht.remote_addresses),
        ] {
            self.dht_records
                .get_or_create(&PathLabel { path: kind.into() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// The registry a node's `GET /metrics` renders, and mesh's families in it.
#[derive(Clone)]
pub struct Telemetry {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    /// The calls the console's inspector and `/v1/mesh/events` show.
    pub inspector: crate::inspector::Inspector,
}

impl Default for Telemetry {
    /// An empty registry, for an API whose node keeps no metrics.
    fn default() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        Telemetry {
            registry: Arc::new(registry),
            metrics,
            inspector: Default::default(),
        }
    }
}

/// `registry` in Prometheus's text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_bounded_labels() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.served(Some("echo"), Outcome::Answered);
        metrics.served(Some("echo"), Outcome::Refused("unauthorized"));
        metrics.served(None, Outcome::Failed("unknown_model"));
        metrics.answered(
            "echo",
            Duration::from_millis(12),
            Duration::from_millis(40),
            7,
        );
        metrics.made("echo", Outcome::Answered, "hole-punched");
        metrics.catalog_served();
        metrics.connections_trimmed(3);
        metrics.dht_lookup(5);
        for n in 0..MAX_MODEL_LABELS + 10 {
            metrics.made(&format!("m{n}"), Outcome::Failed("unknown_model"), "none");
        }
        metrics.hole_punch(true);
        metrics.peers_by_path(&[("direct", 3), ("relayed", 1)]);
        let text = render(&registry);
        assert!(
            text.contains(r#"mesh_calls_served_total{model="echo",outcome="answered",code=""} 1"#)
        );
        assert!(text.contains(
            r#"mesh_calls_served_total{model="echo",outcome="refused",code="unauthorized"} 1"#
        ));
        assert!(text.contains(r#"model="other",outcome="failed",code="unknown_model"} 1"#));
        assert!(text.contains("mesh_catalogs_served_total 1"), "{text}");
        assert!(text.contains("mesh_connections_trimmed_total 3"), "{text}");
        assert!(text.contains("mesh_dht_lookup_requests_sum 5.0"), "{text}");
        assert!(text.contains("mesh_dht_lookup_requests_count 1"), "{text}");
        assert!(text.contains(r#"mesh_tokens_generated_total{model="echo"} 7"#));
        assert!(text.contains(r#"mesh_first_output_seconds_count{model="echo"} 1"#));
        assert!(text.contains(r#"path="hole-punched"} 1"#));
        assert!(text.contains(r#"mesh_hole_punches_total{result="success"} 1"#));
        assert!(text.contains(r#"mesh_peers{path="direct"} 3"#));
        // 64 names, then `other` for the names past the 64th.
        let made_names: HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("mesh_calls_made_total{"))
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(made_names.len(), MAX_MODEL_LABELS + 1);
        assert!(made_names.contains("other"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_last_minute_counts_by_outcome_and_forgets_older_seconds() {
        let mut recent = Recent::default();
        let t0 = recent.start;
        recent.count(Outcome::Answered, t0);
        recent.count(Outcome::Answered, t0 + Duration::from_millis(500));
        recent.count(
            Outcome::Refused("unauthorized"),
            t0 + Duration::from_secs(30),
        );
        recent.count(Outcome::Failed("internal"), t0 + Duration::from_secs(59));
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            recent.last_minute(at(59)),
            LastMinute {
                answered: 2,
                refused: 1,
                failed: 1,
                cancelled: 0
            }
        );
        assert_eq!(recent.last_minute(at(60)).answered, 0, "a minute later");
        assert_eq!(recent.last_minute(at(89)).refused, 1);
        assert_eq!(recent.last_minute(at(200)), LastMinute::default());
        // One entry per second at most, 60 seconds at most.
        for s in 0..500 {
            recent.count(Outcome::Cancelled, at(100 + s));
        }
        assert!(recent.seconds.len() <= 60);
        assert_eq!(recent.last_minute(at(599)).cancelled, 60);
    }
}
