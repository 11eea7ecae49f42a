//! Finding models on the DHT: announcing the ones this node hosts, asking who hosts one, and
//! walking the DHT to fill the routing table.
//!
//! Plain bookkeeping with no swarm, like [`super::relays`]: the swarm task starts the Kademlia
//! queries, hands the results here, and does what the methods return. Generic over the query
//! id so it is tested without Kademlia.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::{Duration, Instant};

use libp2p::kad::RecordKey;
use libp2p::PeerId;
use mesh_protocol::ids::{blob_provider_key, model_provider_key, stage_provider_key};

use super::connect::Reply;
use super::NetworkError;

/// While the routing table is small, announcements go out again when a new neighbour appears,
/// at most this often.
pub const REANNOUNCE_AFTER: Duration = Duration::from_secs(2);
/// A routing table this full (Kademlia's k) no longer brings out announcements on new
/// neighbours: past it, a node cannot tell from a new neighbour whether the nodes nearest its
/// keys changed, and announcing on every one grows with the mesh's joins (docs/scale.md).
pub const SMALL_TABLE: usize = 20;
/// After a node first announces, it announces every topic again this long after, while the
/// mesh around it settles (records placed by its first walks may sit on nodes that were the
/// nearest it knew then); past the last, Kademlia's own republishing (every 5 minutes) keeps
/// the records on the nodes nearest each key. Each is stretched by up to a fifth, by the
/// node's id, so nodes started together do not announce together.
pub const SETTLE_REANNOUNCES: [Duration; 3] = [
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(90),
];
/// Once a provider query has found a host, how long it may go on finding more before it
/// answers with what it has: a walk that waits on a departed or frozen peer does not hold up
/// the call (Kademlia would wait for that peer's request to time out).
pub const PROVIDERS_GRACE: Duration = Duration::from_millis(200);

/// Most providers one lookup keeps (and dials).
pub const MAX_PROVIDERS_PER_QUERY: usize = 32;

/// What a node announces in the DHT: a model it serves by name, or some layers of a model's
/// weights (named by their sha256) that it runs for heads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    Model(String),
    Stage(String),
    /// A model's file, by its sha256 (served over `/mesh/blob/1`).
    Blob(String),
}

impl Topic {
    /// The DHT key under which its hosts announce themselves.
    pub fn key(&self) -> RecordKey {
        match self {
            Topic::Model(model) => RecordKey::new(&model_provider_key(model)),
            Topic::Stage(sha256) => RecordKey::new(&stage_provider_key(sha256)),
            Topic::Blob(sha256) => RecordKey::new(&blob_provider_key(sha256)),
        }
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topic::Model(model) => write!(f, "model {model}"),
            Topic::Stage(sha256) => write!(f, "layers of {sha256}"),
            Topic::Blob(sha256) => write!(f, "the file {sha256}"),
        }
    }
}

/// A provider query in progress: the hosts found so far, when the first was, and who waits.
#[derive(Debug)]
struct ProviderQuery {
    found: HashSet<PeerId>,
    first_found: Option<Instant>,
    reply: Reply<Vec<PeerId>>,
}

#[derive(Debug)]
pub struct Discovery<Q = libp2p::kad::QueryId> {
    local: PeerId,
    provided: HashSet<Topic>,
    last_announce: Option<Instant>,
    /// When the first announcement went out, and how many settling re-announces are done.
    settling: Option<(Instant, usize)>,
    /// 1 to 1.2, from the node's id: spreads the settling re-announces of nodes started
    /// together.
    stretch: f64,
    provider_queries: HashMap<Q, ProviderQuery>,
    bootstrap_queries: HashMap<Q, Reply<()>>,
}

impl<Q: Hash + Eq + Clone> Discovery<Q> {
    pub fn new(local: PeerId) -> Self {
        Discovery {
            local,
            provided: HashSet::new(),
            last_announce: None,
            settling: None,
            stretch: 1.0 + f64::from(local.to_bytes().last().copied().unwrap_or(0)) / 255.0 * 0.2,
            provider_queries: HashMap::new(),
            bootstrap_queries: HashMap::new(),
        }
    }

    /// This node hosts `topic`: the topics to announce now (every one, as a new one is a good
    /// moment to refresh them all).
    pub fn provide(&mut self, topic: Topic, now: Instant) -> Vec<Topic> {
        self.provided.insert(topic);
        self.announce_all(now)
    }

    /// A new peer entered the routing table, which now holds `table_peers`. While the table
    /// is smaller than [`SMALL_TABLE`], the newcomer is likely one of the nodes nearest our
    /// keys (a node just started, or a small mesh): the topics to announce again, unless they
    /// went out less than [`REANNOUNCE_AFTER`] ago. Past it, nothing: the settling
    /// re-announces and Kademlia's republishing place the records.
    pub fn on_new_neighbour(&mut self, table_peers: usize, now: Instant) -> Vec<Topic> {
        let stale = self
            .last_announce
            .is_none_or(|t| now.duration_since(t) > REANNOUNCE_AFTER);
        if self.provided.is_empty() || !stale || table_peers >= SMALL_TABLE {
            return Vec::new();
        }
        self.announce_all(now)
    }

    /// When the next settling re-announce is due, if one is.
    pub fn settle_due(&self) -> Option<Instant> {
        let (first, done) = self.settling?;
        if self.provided.is_empty() {
            return None;
        }
        let after = SETTLE_REANNOUNCES.get(done)?;
        Some(first + after.mul_f64(self.stretch))
    }

    /// The settling re-announce that is due: the topics to announce again.
    pub fn on_settle_due(&mut self, now: Instant) -> Vec<Topic> {
        if self.settle_due().is_none_or(|due| now < due) {
            return Vec::new();
        }
        if let Some((_, done)) = self.settling.as_mut() {
            *done += 1;
        }
        self.announce_all(now)
    }

    /// This node became reachable at a new address (a relay reservation, a confirmed public
    /// address): every topic is announced again at once, so the DHT's provider records carry
    /// the address and lookups find the node there.
    pub fn on_new_address(&mut self, now: Instant) -> Vec<Topic> {
        if self.provided.is_empty() {
            return Vec::new();
        }
        self.announce_all(now)
    }

    fn announce_all(&mut self, now: Instant) -> Vec<Topic> {
        self.last_announce = Some(now);
        self.settling.get_or_insert((now, 0));
        let mut topics: Vec<Topic> = self.provided.iter().cloned().collect();
        topics.sort();
        topics
    }

    /// The topics to stop announcing, on shutdown.
    pub fn stop_all(&mut self) -> Vec<Topic> {
        self.provided.drain().collect()
    }

    /// Query `id` looks for hosts of a model; `reply` gets them when the walk ends, or
    /// [`PROVIDERS_GRACE`] after the first was found.
    pub fn providers_started(&mut self, id: Q, reply: Reply<Vec<PeerId>>) {
        let query = ProviderQuery {
            found: HashSet::new(),
            first_found: None,
            reply,
        };
        self.provider_queries.insert(id, query);
    }

    /// Query `id` found `providers`: those that are not this node, which the caller dials at
    /// once (their addresses live only as long as the query), among at most
    /// [`MAX_PROVIDERS_PER_QUERY`] kept in all: a key full of hostile records cannot make one
    /// lookup dial without end.
    pub fn on_providers(
        &mut self,
        id: &Q,
        providers: impl IntoIterator<Item = PeerId>,
        now: Instant,
    ) -> Vec<PeerId> {
        let local = self.local;
        let Some(query) = self.provider_queries.get_mut(id) else {
            // A walk answered already: what it finds is still worth a dial, within the bound.
            return providers
                .into_iter()
                .filter(|p| *p != local)
                .take(MAX_PROVIDERS_PER_QUERY)
                .collect();
        };
        // Every kept host this step reports is dialled, again if it was before: a report may
        // carry addresses an earlier one lacked (the dial is skipped while one is under way).
        let mut dial = Vec::new();
        for provider in providers {
            if provider == local {
                continue;
            }
            let kept = query.found.contains(&provider)
                || (query.found.len() < MAX_PROVIDERS_PER_QUERY && query.found.insert(provider));
            if kept && !dial.contains(&provider) {
                dial.push(provider);
            }
        }
        if !query.found.is_empty() {
            query.first_found.get_or_insert(now);
        }
        dial
    }

    /// When the next provider query is due to answer early, if one is.
    pub fn next_due(&self) -> Option<Instant> {
        self.provider_queries
            .values()
            .filter_map(|q| q.first_found)
            .min()
            .map(|first| first + PROVIDERS_GRACE)
    }

    /// Answers every provider query whose grace after its first host has passed, with what it
    /// found; returns their ids, for the caller to end the walks.
    pub fn answer_due(&mut self, now: Instant) -> Vec<Q> {
        let due: Vec<Q> = self
            .provider_queries
            .iter()
            .filter(|(_, q)| q.first_found.is_some_and(|t| now >= t + PROVIDERS_GRACE))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            self.providers_done(id);
        }
        due
    }

    /// Provider query `id` ended: it answers with every host found (unless it answered
    /// already). A walk that finds nobody ends by the query timeout (15 s), which stays below
    /// the client's wait (20 s).
    pub fn providers_done(&mut self, id: &Q) {
        if let Some(query) = self.provider_queries.remove(id) {
            let mut found: Vec<PeerId> = query.found.into_iter().collect();
            found.sort();
            let _ = query.reply.send(Ok(found));
        }
    }

    /// A DHT walk `id` started; `reply` gets its end.
    pub fn bootstrap_started(&mut self, id: Q, reply: Reply<()>) {
        self.bootstrap_queries.insert(id, reply);
    }

    /// A step of walk `id`: `remaining` buckets still to walk (`Err`: the step failed), and
    /// whether it is the query's last step. The reply goes out when the walk is over.
    pub fn on_bootstrap_step(
        &mut self,
        id: &Q,
        result: Result<u32, libp2p::kad::BootstrapError>,
        last: bool,
    ) {
        let done = result.as_ref().map_or(true, |remaining| *remaining == 0);
        if done || last {
            if let Some(reply) = self.bootstrap_queries.remove(id) {
                let _ = reply.send(result.map(|_| ()).map_err(NetworkError::Bootstrap));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> Topic {
        Topic::Model(name.into())
    }
    use tokio::sync::oneshot;

    use crate::test_support::random_peer as peer;

    #[test]
    fn providing_announces_every_model_and_new_neighbours_are_throttled() {
        let mut d = Discovery::<u32>::new(peer());
        let t = Instant::now();
        assert!(
            d.on_new_neighbour(1, t).is_empty(),
            "nothing to announce yet"
        );
        assert_eq!(d.provide(model("echo"), t), vec![model("echo")]);
        assert_eq!(
            d.provide(model("tiny"), t),
            vec![model("echo"), model("tiny")]
        );
        assert!(d.on_new_neighbour(2, t + Duration::from_secs(1)).is_empty());
        assert_eq!(d.on_new_neighbour(3, t + Duration::from_secs(3)).len(), 2);
        assert!(
            d.on_new_neighbour(4, t + Duration::from_secs(4)).is_empty(),
            "the re-announce counts too"
        );
        assert_eq!(
            d.on_new_address(t + Duration::from_secs(4)).len(),
            2,
            "a new address is announced at once"
        );
        assert!(d.on_new_neighbour(5, t + Duration::from_secs(5)).is_empty());
        assert_eq!(d.stop_all().len(), 2);
        assert!(d.on_new_address(t + Duration::from_secs(60)).is_empty());
        assert!(d
            .on_new_neighbour(5, t + Duration::from_secs(60))
            .is_empty());
    }

    #[test]
    fn past_a_small_table_new_neighbours_bring_out_nothing() {
        let mut d = Discovery::<u32>::new(peer());
        let t = Instant::now();
        d.provide(model("echo"), t);
        let later = t + Duration::from_secs(5);
        assert!(d.on_new_neighbour(SMALL_TABLE, later).is_empty());
        assert!(d.on_new_neighbour(SMALL_TABLE + 100, later).is_empty());
        assert_eq!(d.on_new_neighbour(SMALL_TABLE - 1, later).len(), 1);
    }

    #[test]
    fn the_first_announcement_is_followed_by_settling_ones_then_none() {
        let mut d = Discovery::<u32>::new(peer());
        assert_eq!(d.settle_due(), None, "nothing announced yet");
        let t = Instant::now();
        d.provide(model("echo"), t);
        let mut at = Vec::new();
        while let Some(due) = d.settle_due() {
            assert!(
                d.on_settle_due(due - Duration::from_millis(1)).is_empty(),
                "not before it is due"
            );
            assert_eq!(d.on_settle_due(due), vec![model("echo")]);
            at.push(due.duration_since(t));
        }
        assert_eq!(at.len(), SETTLE_REANNOUNCES.len());
        for (got, base) in at.iter().zip(SETTLE_REANNOUNCES) {
            assert!(
                *got >= base && *got <= base.mul_f64(1.2),
                "{got:?} stretched from {base:?}"
            );
        }
        // A topic provided later is announced at once and does not restart the schedule.
        let end = t + Duration::from_secs(600);
        assert_eq!(d.provide(model("tiny"), end).len(), 2);
        assert_eq!(d.settle_due(), None);
        assert!(d.on_settle_due(end).is_empty());
        // Nothing provided, nothing due.
        let mut idle = Discovery::<u32>::new(peer());
        idle.provide(model("echo"), t);
        idle.stop_all();
        assert_eq!(idle.settle_due(), None);
    }

    #[test]
    fn a_provider_query_answers_every_host_but_this_node_once_done() {
        let me = peer();
        let (a, b) = (peer(), peer());
        let t = Instant::now();
        let mut d = Discovery::<u32>::new(me);
        let (tx, mut rx) = oneshot::channel();
        d.providers_started(1, tx);
        assert_eq!(d.on_providers(&1, [me], t), Vec::<PeerId>::new());
        assert_eq!(d.next_due(), None, "only this node found: no grace yet");
        assert_eq!(d.on_providers(&1, [a, me], t), vec![a]);
        assert_eq!(
            d.on_providers(&1, [a, b], t),
            vec![a, b],
            "a host reported again is dialled again"
        );
        assert!(rx.try_recv().is_err(), "waits for the walk");
        d.providers_done(&1);
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(rx.try_recv().unwrap().unwrap(), expected);
        d.providers_done(&1);
        assert_eq!(
            d.on_providers(&2, [a], t),
            vec![a],
            "not ours: still worth a dial"
        );
    }

    #[test]
    fn a_provider_query_keeps_and_dials_a_bounded_number_of_hosts() {
        let mut d = Discovery::<u32>::new(peer());
        let (tx, mut rx) = oneshot::channel();
        d.providers_started(1, tx);
        let t = Instant::now();
        let flood: Vec<PeerId> = (0..500).map(|_| peer()).collect();
        let dialled = d.on_providers(&1, flood.iter().copied(), t);
        assert_eq!(dialled.len(), MAX_PROVIDERS_PER_QUERY);
        assert!(d.on_providers(&1, [peer()], t).is_empty(), "full");
        assert_eq!(
            d.on_providers(&1, [flood[0]], t),
            vec![flood[0]],
            "a kept host reported again is dialled again"
        );
        d.providers_done(&1);
        assert_eq!(
            rx.try_recv().unwrap().unwrap().len(),
            MAX_PROVIDERS_PER_QUERY
        );
        assert_eq!(
            d.on_providers(&9, flood.iter().copied(), t).len(),
            MAX_PROVIDERS_PER_QUERY
        );
    }

    #[test]
    fn a_provider_query_answers_a_grace_after_its_first_host() {
        let (a, b) = (peer(), peer());
        let t = Instant::now();
        let mut d = Discovery::<u32>::new(peer());
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        d.providers_started(1, tx1);
        d.providers_started(2, tx2);
        d.on_providers(&1, [a], t);
        d.on_providers(&1, [b], t + Duration::from_millis(100));
        assert_eq!(
            d.next_due(),
            Some(t + PROVIDERS_GRACE),
            "from the first host"
        );
        assert!(d.answer_due(t + PROVIDERS_GRACE / 2).is_empty());
        assert!(rx1.try_recv().is_err());
        assert_eq!(d.answer_due(t + PROVIDERS_GRACE), vec![1]);
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(rx1.try_recv().unwrap().unwrap(), both);
        // Query 2 found nobody: it waits for its walk to end, however long.
        assert_eq!(d.next_due(), None);
        assert!(d.answer_due(t + Duration::from_secs(60)).is_empty());
        assert!(rx2.try_recv().is_err());
        d.providers_done(&1);
        d.providers_done(&2);
        assert_eq!(rx2.try_recv().unwrap().unwrap(), Vec::<PeerId>::new());
    }

    #[test]
    fn a_walk_answers_when_no_bucket_remains() {
        let mut d = Discovery::<u32>::new(peer());
        let (tx, mut rx) = oneshot::channel();
        d.bootstrap_started(1, tx);
        d.on_bootstrap_step(&1, Ok(3), false);
        assert!(rx.try_recv().is_err());
        d.on_bootstrap_step(&1, Ok(0), false);
        assert!(rx.try_recv().unwrap().is_ok());

        let (tx, mut rx) = oneshot::channel();
        d.bootstrap_started(2, tx);
        d.on_bootstrap_step(&2, Ok(2), true);
        assert!(rx.try_recv().unwrap().is_ok(), "the last step ends it too");
    }
}
