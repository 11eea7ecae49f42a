//! The providers of recent `any` calls, by model, the calls this node has running on each
//! provider, and the providers that recently stopped answering: shared by the calls of one
//! node (its API's), so repeated calls skip the DHT, concurrent calls spread over the
//! providers, and a frozen provider is left alone for a while.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::candidates::{route, Candidate};

/// How long a model's providers found through the DHT are reused without asking again.
pub const PROVIDER_CACHE_TTL: Duration = Duration::from_secs(10);
/// Most models whose providers are cached at once.
const PROVIDER_CACHE_MODELS: usize = 1024;
/// A provider that stopped answering a call is tried after every other for this long.
pub const UNRESPONSIVE_FOR: Duration = Duration::from_secs(30);
/// Most providers remembered as unresponsive at once.
const UNRESPONSIVE_PEERS: usize = 1024;

/// The providers of `any` lookups, by model, for [`PROVIDER_CACHE_TTL`]. An entry is dropped
/// as soon as a call to one of its providers fails on the network.
#[derive(Default)]
pub struct ProviderCache {
    entries: Mutex<HashMap<String, (Instant, Vec<Candidate>)>>,
    /// Calls this node has running on each provider now, added to the load it advertised.
    in_flight: Mutex<HashMap<PeerId, u32>>,
    /// Providers that stopped answering a call, and when.
    unresponsive: Mutex<HashMap<PeerId, Instant>>,
}

/// Counts a call on `peer` in its provider's in-flight total while it lives.
pub(crate) struct InFlight<'a> {
    cache: &'a ProviderCache,
    peer: PeerId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self.cache.counts();
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

impl ProviderCache {
    fn counts(&self) -> MutexGuard<'_, HashMap<PeerId, u32>> {
        self.in_flight
            .lock()
            .expect("never poisoned: no panics while held")
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, (Instant, Vec<Candidate>)>> {
        self.entries
            .lock()
            .expect("never poisoned: no panics while held")
    }

    /// The providers of `model` found less than [`PROVIDER_CACHE_TTL`] ago.
    pub(crate) fn get(&self, model: &str) -> Option<Vec<Candidate>> {
        self.entries()
            .get(model)
            .filter(|(at, _)| at.elapsed() < PROVIDER_CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    /// Remembers the providers of `model`; when the cache is full of live entries, it is not
    /// remembered.
    pub(crate) fn put(&self, model: &str, candidates: &[Candidate]) {
        let mut entries = self.entries();
        if entries.len() >= PROVIDER_CACHE_MODELS {
            entries.retain(|_, (at, _)| at.elapsed() < PROVIDER_CACHE_TTL);
        }
        if entries.len() < PROVIDER_CACHE_MODELS {
            entries.insert(model.to_string(), (Instant::now(), candidates.to_vec()));
        }
    }

    /// Forgets the providers of `model`, so the next call asks the DHT again.
    pub(crate) fn forget(&self, model: &str) {
        self.entries().remove(model);
    }

    /// Counts a call on `peer` until the returned guard drops.
    pub(crate) fn start_call(&self, peer: PeerId) -> InFlight<'_> {
        *self.counts().entry(peer).or_default() += 1;
        InFlight { cache: self, peer }
    }

    fn marks(&self) -> MutexGuard<'_, HashMap<PeerId, Instant>> {
        self.unresponsive
            .lock()
            .expect("never poisoned: no panics while held")
    }

    /// `peer` stopped answering a call: it is tried last for [`UNRESPONSIVE_FOR`].
    pub(crate) fn mark_unresponsive(&self, peer: PeerId) {
        let mut marks = self.marks();
        if marks.len() >= UNRESPONSIVE_PEERS {
            marks.retain(|_, at| at.elapsed() < UNRESPONSIVE_FOR);
        }
        if marks.len() < UNRESPONSIVE_PEERS || marks.contains_key(&peer) {
            marks.insert(peer, Instant::now());
        }
    }

    /// The providers marked unresponsive less than [`UNRESPONSIVE_FOR`] ago.
    pub(crate) fn unresponsive(&self) -> HashSet<PeerId> {
        self.marks()
            .iter()
            .filter(|(_, at)| at.elapsed() < UNRESPONSIVE_FOR)
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Orders `candidates` with [`route`] and counts a call on the first, in one step, so
    /// concurrent calls spread over the providers instead of all picking the same one.
    pub(crate) fn route_and_claim(
        &self,
        candidates: Vec<Candidate>,
        me: PeerId,
        rtt_ms: &HashMap<PeerId, f64>,
    ) -> (Vec<Candidate>, Option<InFlight<'_>>) {
        let unresponsive = self.unresponsive();
        let mut counts = self.counts();
        let ordered = route(candidates, me, rtt_ms, &counts, &unresponsive);
        let claim = ordered.first().map(|first| {
            *counts.entry(first.peer).or_default() += 1;
            InFlight {
                cache: self,
                peer: first.peer,
            }
        });
        (ordered, claim)
    }

    #[cfg(test)]
    fn in_flight(&self) -> HashMap<PeerId, u32> {
        self.counts().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::candidates::tests::{candidate, peer};

    #[test]
    fn in_flight_counts_end_with_the_call() {
        let cache = ProviderCache::default();
        let p = peer();
        let first = cache.start_call(p);
        let second = cache.start_call(p);
        assert_eq!(cache.in_flight().get(&p), Some(&2));
        drop(first);
        assert_eq!(cache.in_flight().get(&p), Some(&1));
        drop(second);
        assert!(cache.in_flight().is_empty());
    }

    #[test]
    fn concurrent_claims_spread_over_equal_providers() {
        let cache = ProviderCache::default();
        let (me, a, b) = (peer(), peer(), peer());
        let both = vec![candidate(a, 0), candidate(b, 0)];
        let rtts = [(a, 1.0), (b, 2.0)].into_iter().collect();
        let (order, first) = cache.route_and_claim(both.clone(), me, &rtts);
        assert_eq!(order[0].peer, a, "the nearer one first");
        assert!(first.is_some());
        // `a` now has a call running: the next call goes to `b`.
        let (order, second) = cache.route_and_claim(both.clone(), me, &rtts);
        assert_eq!(order[0].peer, b);
        assert_eq!(cache.in_flight(), [(a, 1), (b, 1)].into_iter().collect());
        drop((first, second));
        assert!(cache.in_flight().is_empty());
        let (_, none) = cache.route_and_claim(Vec::new(), me, &rtts);
        assert!(none.is_none(), "nothing to claim");
    }

    #[test]
    fn a_provider_that_stopped_answering_is_tried_last_for_a_while() {
        let cache = ProviderCache::default();
        let (me, frozen, slow) = (peer(), peer(), peer());
        let both = vec![candidate(frozen, 0), candidate(slow, 0)];
        let rtts = [(frozen, 1.0), (slow, 50.0)].into_iter().collect();
        cache.mark_unresponsive(frozen);
        let (order, claim) = cache.route_and_claim(both.clone(), me, &rtts);
        assert_eq!(order[0].peer, slow, "the nearer one stopped answering");
        assert_eq!(order[1].peer, frozen, "but it is still a candidate");
        drop(claim);
        // Once the mark is old enough, it is nearest first again.
        *cache.marks().get_mut(&frozen).unwrap() =
            Instant::now() - UNRESPONSIVE_FOR - Duration::from_millis(1);
        assert!(cache.unresponsive().is_empty());
        let (order, _claim) = cache.route_and_claim(both, me, &rtts);
        assert_eq!(order[0].peer, frozen);
    }

    #[test]
    fn unresponsive_marks_are_bounded() {
        let cache = ProviderCache::default();
        for _ in 0..UNRESPONSIVE_PEERS + 10 {
            cache.mark_unresponsive(peer());
        }
        assert_eq!(cache.marks().len(), UNRESPONSIVE_PEERS);
    }

    #[test]
    fn providers_are_kept_until_forgotten() {
        let cache = ProviderCache::default();
        assert_eq!(cache.get("m"), None);
        let found = vec![candidate(peer(), 1)];
        cache.put("m", &found);
        assert_eq!(cache.get("m"), Some(found));
        assert_eq!(cache.get("other"), None);
        cache.forget("m");
        assert_eq!(cache.get("m"), None);
    }

    #[test]
    fn a_full_cache_makes_room_only_from_expired_entries() {
        let cache = ProviderCache::default();
        let found = vec![candidate(peer(), 0)];
        for i in 0..PROVIDER_CACHE_MODELS {
            cache.put(&format!("m{i}"), &found);
        }
        cache.put("one-too-many", &found);
        assert_eq!(
            cache.get("one-too-many"),
            None,
            "live entries are not evicted"
        );
        assert!(cache.get("m0").is_some());
        // Age one entry past the TTL: it makes room.
        cache.entries().get_mut("m0").unwrap().0 =
            Instant::now() - PROVIDER_CACHE_TTL - Duration::from_millis(1);
        assert_eq!(cache.get("m0"), None, "an expired entry is not returned");
        cache.put("one-too-many", &found);
        assert!(cache.get("one-too-many").is_some());
    }
}
