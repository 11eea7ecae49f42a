//! Load: many concurrent calls at once at a node's API, through the OpenAI gateway or over the
//! mesh (`/v1/mesh/infer`, which the node dispatches to a provider over libp2p). Every call
//! must end answered or refused (429/503/`overloaded`) within its deadline; a call that fails
//! otherwise, or hangs past its deadline, is counted as such. `testnet/load.sh` runs it against
//! real `mesh join` processes and watches their memory and descriptors.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use super::Stats;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    /// 429, 503 or `overloaded`: the node said no at once, as it should under load.
    Refused,
    Failed,
    /// No end within the deadline plus a grace period.
    Hung,
}

/// Which door of the node the calls use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Gateway,
    Mesh,
}

impl std::str::FromStr for Via {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gateway" => Ok(Via::Gateway),
            "mesh" => Ok(Via::Mesh),
            other => Err(format!("--via {other:?}: gateway or mesh")),
        }
    }
}

/// What happened to `calls` concurrent calls.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<(Outcome, Duration)>,
    pub wall: Duration,
    /// The first few failures, for the log.
    pub failures: Vec<String>,
}

impl Report {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.outcomes.iter().filter(|(o, _)| *o == outcome).count()
    }

    pub fn to_json(&self, via: Via, model: &str) -> serde_json::Value {
        let times = |o: Outcome| -> Vec<Duration> {
            self.outcomes
                .iter()
                .filter(|(x, _)| *x == o)
                .map(|(_, d)| *d)
                .collect()
        };
        let stats = |o| {
            let t = times(o);
            (!t.is_empty()).then(|| {
                let s = Stats::of(&t);
                json!({ "p50_ms": s.p50_us as f64 / 1000.0, "p99_ms": s.p99_us as f64 / 1000.0 })
            })
        };
        json!({
            "bench": "load", "via": format!("{via:?}").to_lowercase(), "model": model,
            "calls": self.outcomes.len(), "answered": self.count(Outcome::Answered),
            "refused": self.count(Outcome::Refused), "failed": self.count(Outcome::Failed),
            "hung": self.count(Outcome::Hung), "wall_ms": self.wall.as_millis() as u64,
            "answered_latency": stats(Outcome::Answered),
            "refused_latency": stats(Outcome::Refused),
            "failures": self.failures,
        })
    }
}

/// Sends `calls` calls at once to the node whose API is `api` (`http://127.0.0.1:PORT`).
pub async fn run(api: &str, via: Via, model: &str, calls: usize, deadline: Duration) -> Report {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("a plain HTTP client builds");
    let begin = Instant::now();
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let (http, api, model) = (http.clone(), api.to_string(), model.to_string());
            tokio::spawn(async move {
                let start = Instant::now();
                let grace = deadline + Duration::from_secs(5);
                let end = tokio::time::timeout(grace, one(&http, &api, via, &model, i, deadline));
                let (outcome, why) = match end.await {
                    Ok(result) => result,
                    Err(_) => (Outcome::Hung, format!("call {i}: no end within {grace:?}")),
                };
                (outcome, start.elapsed(), why)
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(calls);
    let mut failures = Vec::new();
    for task in tasks {
        let (outcome, took, why) = task.await.expect("a call task never panics");
        if matches!(outcome, Outcome::Failed | Outcome::Hung) && failures.len() < 5 {
            failures.push(why);
        }
        outcomes.push((outcome, took));
    }
    Report {
        outcomes,
        wall: begin.elapsed(),
        failures,
    }
}

async fn one(
    http: &reqwest::Client,
    api: &str,
    via: Via,
    model: &str,
    i: usize,
    deadline: Duration,
) -> (Outcome, String) {
    let prompt = format!("load call {i}");
    let sent = match via {
        Via::Gateway => http
            .post(format!("{api}/v1/chat/completions"))
            .json(&json!({ "model": model, "temperature": 0, "max_tokens": 8,
                           "messages": [{ "role": "user", "content": prompt }] })),
        Via::Mesh => http.post(format!("{api}/v1/mesh/infer")).json(&json!({
            "target": "any", "model": model, "prompts": [prompt],
            "params": { "max_tokens": 8, "temperature": 0.0 },
            "deadline_ms": deadline.as_millis() as u64,
        })),
    }
    .send()
    .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => return (Outcome::Failed, format!("call {i}: {e}")),
    };
    let status = response.status();
    if status == 429 || status == 503 {
        return (Outcome::Refused, String::new());
    }
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return (Outcome::Failed, format!("call {i}: HTTP {status}: {body}"));
    }
    match via {
        Via::Gateway => match response.json::<serde_json::Value>().await {
            Ok(v) if v["choices"][0]["message"]["content"].is_string() => {
                (Outcome::Answered, String::new())
            }
            Ok(v) => (Outcome::Failed, format!("call {i}: no answer in {v}")),
            Err(e) => (Outcome::Failed, format!("call {i}: {e}")),
        },
        Via::Mesh => last_event(response, i).await,
    }
}

/// Reads `/v1/mesh/infer`'s NDJSON to its last event.
async fn last_event(response: reqwest::Response, i: usize) -> (Outcome, String) {
    let mut body = response.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => buf.extend_from_slice(&c),
            Err(e) => return (Outcome::Failed, format!("call {i}: {e}")),
        }
    }
    let last = buf
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok());
    match last {
        Some(e) if e["event"] == "done" => (Outcome::Answered, String::new()),
        Some(e) if e["event"] == "error" && e["code"] == "overloaded" => {
            (Outcome::Refused, String::new())
        }
        Some(e) => (Outcome::Failed, format!("call {i}: {e}")),
        None => (Outcome::Failed, format!("call {i}: no events")),
    }
}
