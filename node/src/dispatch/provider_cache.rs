//! The providers of recent `any` calls, by model, the calls this node has running on each
//! provider, the providers backed off for misbehaving, and how long each provider made recent
//! calls wait for their first frame: shared by the calls of one node (its API's), so repeated
//! calls skip the DHT, concurrent calls spread over the providers, a frozen, refusing or
//! stalling provider is left alone for a while (as Petals bans a failing server), and one that
//! claims to be idle but answers slowly is tried after the fast ones.

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
/// Most providers backed off at once.
const BACKED_OFF_PEERS: usize = 1024;
/// How long a first-frame measurement counts: after it, the provider is measured afresh.
pub const FIRST_FRAME_TTL: Duration = Duration::from_secs(120);
/// Most (provider, model) first-frame measurements kept at once.
const FIRST_FRAME_ENTRIES: usize = 4096;
/// The weight of a new first-frame measurement in the running average.
const FIRST_FRAME_ALPHA: f64 = 0.5;

/// Why a provider is backed off: it is tried after every other provider for
/// [`Misbehaviour::back_off`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// It stopped answering mid-call, and did not answer a check of its catalog.
    Unresponsive,
    /// It sent nothing in the first frame's time while another provider was waiting.
    Stalled,
    /// It refused the call (`unauthorized`): its policy, or a hostile node breaking a name.
    Refused,
    /// It announced the model, then said it does not host it.
    DeniedModel,
}

/// The longest a provider is backed off, however often it misbehaved.
pub const MAX_BACK_OFF: Duration = Duration::from_secs(3600);

/// A provider's back-off: until when, and how many times it misbehaved since it last answered.
#[derive(Debug, Clone, Copy)]
struct Mark {
    until: Instant,
    strikes: u32,
}

impl Misbehaviour {
    /// How long a provider is tried last after this, the first time; each time again before
    /// it answers a call doubles it, up to [`MAX_BACK_OFF`].
    pub fn back_off(self) -> Duration {
        match self {
            Misbehaviour::Unresponsive | Misbehaviour::Stalled => UNRESPONSIVE_FOR,
            Misbehaviour::Refused => Duration::from_secs(120),
            Misbehaviour::DeniedModel => Duration::from_secs(300),
        }
    }
}

/// The providers of `any` lookups, by model, for [`PROVIDER_CACHE_TTL`]. An entry is dropped
/// as soon as a call to one of its providers fails on the network.
#[derive(Default)]
pub struct ProviderCache {
    entries: Mutex<HashMap<String, (Instant, Vec<Candidate>)>>,
    /// Calls this node has running on each provider now, added to the load it advertised.
    in_flight: Mutex<HashMap<PeerId, u32>>,
    /// Providers backed off: until when, and how often they misbehaved.
    backed_off: Mutex<HashMap<PeerId, Mark>>,
    /// The time recent calls to each provider of a model waited for their first frame, in
    /// milliseconds (a running average), and when it was last measured.
    first_frames: Mutex<HashMap<(PeerId, String), (Instant, f64)>>,
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

    fn marks(&self) -> MutexGuard<'_, HashMap<PeerId, Mark>> {
        self.backed_off
            .lock()
            .expect("never poisoned: no panics while held")
    }

    /// `peer` misbehaved: it is tried last for as long as `why` earns
    /// ([`Misbehaviour::back_off`]), doubled for each earlier strike since it last answered
    /// (at most [`MAX_BACK_OFF`]), and never less than an earlier mark still holds it.
    pub(crate) fn back_off(&self, peer: PeerId, why: Misbehaviour) {
        let now = Instant::now();
        let mut marks = self.marks();
        if marks.len() >= BACKED_OFF_PEERS && !marks.contains_key(&peer) {
            marks.retain(|_, mark| mark.until > now);
        }
        if marks.len() >= BACKED_OFF_PEERS && !marks.contains_key(&peer) {
            return;
        }
        let mark = marks.entry(peer).or_insert(Mark {
            until: now,
            strikes: 0,
        });
        mark.strikes = mark.strikes.saturating_add(1);
        let doubled = why
            .back_off()
            .saturating_mul(1u32 << (mark.strikes - 1).min(16))
            .min(MAX_BACK_OFF);
        mark.until = mark.until.max(now + doubled);
    }

    /// `peer` answered a call: its strikes are forgiven.
    pub(crate) fn answered(&self, peer: &PeerId) {
        self.marks().remove(peer);
    }

    /// The providers backed off now.
    pub(crate) fn backed_off(&self) -> HashSet<PeerId> {
        let now = Instant::now();
        self.marks()
            .iter()
            .filter(|(_, mark)| mark.until > now)
            .map(|(peer, _)| *peer)
            .collect()
    }

    fn first_frames(&self) -> MutexGuard<'_, HashMap<(PeerId, String), (Instant, f64)>> {
        self.first_frames
            .lock()
            .expect("never poisoned: no panics while held")
    }

    /// A call of `model` on `peer` waited `waited` for its first frame.
    pub(crate) fn first_frame(&self, peer: PeerId, model: &str, waited: Duration) {
        let now = Instant::now();
        let ms = waited.as_secs_f64() * 1000.0;
        let mut entries = self.first_frames();
        let key = (peer, model.to_string());
        if entries.len() >= FIRST_FRAME_ENTRIES && !entries.contains_key(&key) {
            entries.retain(|_, (at, _)| now.duration_since(*at) < FIRST_FRAME_TTL);
            if entries.len() >= FIRST_FRAME_ENTRIES {
                return;
            }
        }
        let average = match entries.get(&key) {
            Some((at, old)) if now.duration_since(*at) < FIRST_FRAME_TTL => {
                FIRST_FRAME_ALPHA * ms + (1.0 - FIRST_FRAME_ALPHA) * old
            }
            _ => ms,
        };
        entries.insert(key, (now, average));
    }

    /// The first-frame averages of `model`'s providers measured in the last
    /// [`FIRST_FRAME_TTL`], in milliseconds.
    pub(crate) fn first_frames_of(&self, model: &str) -> HashMap<PeerId, f64> {
        self.first_frames()
            .iter()
            .filter(|((_, m), (at, _))| m == model && at.elapsed() < FIRST_FRAME_TTL)
            .map(|((peer, _), (_, ms))| (*peer, *ms))
            .collect()
    }

    /// Orders the `candidates` for `model` with [`route`] and counts a call on the first, in
    /// one step, so concurrent calls spread over the providers instead of all picking the
    /// same one.
    pub(crate) fn route_and_claim(
        &self,
        model: &str,
        candidates: Vec<Candidate>,
        me: PeerId,
        rtt_ms: &HashMap<PeerId, f64>,
    ) -> (Vec<Candidate>, Option<InFlight<'_>>) {
        let backed_off = self.backed_off();
        let first_frames = self.first_frames_of(model);
        let mut counts = self.counts();
        let ordered = route(candidates, me, rtt_ms, &counts, &backed_off, &first_frames);
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
        let (order, first) = cache.route_and_claim("m", both.clone(), me, &rtts);
        assert_eq!(order[0].peer, a, "the nearer one first");
        assert!(first.is_some());
        // `a` now has a call running: the next call goes to `b`.
        let (order, second) = cache.route_and_claim("m", both.clone(), me, &rtts);
        assert_eq!(order[0].peer, b);
        assert_eq!(cache.in_flight(), [(a, 1), (b, 1)].into_iter().collect());
        drop((first, second));
        assert!(cache.in_flight().is_empty());
        let (_, none) = cache.route_and_claim("m", Vec::new(), me, &rtts);
        assert!(none.is_none(), "nothing to claim");
    }

    #[test]
    fn a_provider_that_stopped_answering_is_tried_last_for_a_while() {
        let cache = ProviderCache::default();
        let (me, frozen, slow) = (peer(), peer(), peer());
        let both = vec![candidate(frozen, 0), candidate(slow, 0)];
        let rtts = [(frozen, 1.0), (slow, 50.0)].into_iter().collect();
        cache.back_off(frozen, Misbehaviour::Unresponsive);
        let (order, claim) = cache.route_and_claim("m", both.clone(), me, &rtts);
        assert_eq!(order[0].peer, slow, "the nearer one stopped answering");
        assert_eq!(order[1].peer, frozen, "but it is still a candidate");
        drop(claim);
        // Once the mark is old enough, it is nearest first again.
        cache.marks().get_mut(&frozen).unwrap().until = Instant::now() - Duration::from_millis(1);
        assert!(cache.backed_off().is_empty());
        let (order, _claim) = cache.route_and_claim("m", both, me, &rtts);
        assert_eq!(order[0].peer, frozen);
    }

    #[test]
    fn back_off_marks_are_bounded() {
        let cache = ProviderCache::default();
        for _ in 0..BACKED_OFF_PEERS + 10 {
            cache.back_off(peer(), Misbehaviour::Stalled);
        }
        assert_eq!(cache.marks().len(), BACKED_OFF_PEERS);
    }

    #[test]
    fn a_longer_back_off_is_not_shortened_by_a_shorter_one() {
        let cache = ProviderCache::default();
        let liar = peer();
        cache.back_off(liar, Misbehaviour::DeniedModel);
        let long = cache.marks()[&liar].until;
        cache.back_off(liar, Misbehaviour::Stalled);
        assert!(cache.marks()[&liar].until >= long);
        assert!(Misbehaviour::DeniedModel.back_off() > Misbehaviour::Refused.back_off());
        assert!(Misbehaviour::Refused.back_off() > Misbehaviour::Stalled.back_off());
        assert!(cache.backed_off().contains(&liar));
    }

    #[test]
    fn each_strike_doubles_the_back_off_until_the_provider_answers() {
        let cache = ProviderCache::default();
        let staller = peer();
        let left = |cache: &ProviderCache| cache.marks()[&staller].until - Instant::now();
        cache.back_off(staller, Misbehaviour::Stalled);
        assert!(left(&cache) <= UNRESPONSIVE_FOR);
        cache.back_off(staller, Misbehaviour::Stalled);
        assert!(
            left(&cache) > UNRESPONSIVE_FOR * 3 / 2,
            "{:?}",
            left(&cache)
        );
        for _ in 0..40 {
            cache.back_off(staller, Misbehaviour::DeniedModel);
        }
        assert!(left(&cache) <= MAX_BACK_OFF);
        assert!(left(&cache) > MAX_BACK_OFF - Duration::from_secs(5));
        cache.answered(&staller);
        assert!(cache.backed_off().is_empty());
        cache.back_off(staller, Misbehaviour::Stalled);
        assert!(
            left(&cache) <= UNRESPONSIVE_FOR,
            "forgiven: a first strike again"
        );
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

    #[test]
    fn first_frames_are_averaged_per_model_bounded_and_forgotten() {
        let cache = ProviderCache::default();
        let (slow, fast) = (peer(), peer());
        cache.first_frame(slow, "m", Duration::from_millis(3000));
        cache.first_frame(slow, "m", Duration::from_millis(1000));
        cache.first_frame(fast, "m", Duration::from_millis(20));
        cache.first_frame(slow, "other", Duration::from_millis(5));
        let m = cache.first_frames_of("m");
        assert_eq!(m.len(), 2);
        assert!((m[&slow] - 2000.0).abs() < 1e-6, "a running average");
        assert!((m[&fast] - 20.0).abs() < 1e-6);
        assert_eq!(cache.first_frames_of("other").len(), 1, "per model");

        // The slow provider claiming to be idle comes after the fast one claiming to be busy.
        let (order, _claim) = cache.route_and_claim(
            "m",
            vec![candidate(slow, 0), candidate(fast, 7)],
            peer(),
            &HashMap::new(),
        );
        assert_eq!(
            order.iter().map(|c| c.peer).collect::<Vec<_>>(),
            vec![fast, slow]
        );

        // An old measurement is not used, and is not averaged into a new one.
        for (at, _) in cache.first_frames().values_mut() {
            *at = Instant::now() - FIRST_FRAME_TTL - Duration::from_millis(1);
        }
        assert!(cache.first_frames_of("m").is_empty());
        cache.first_frame(slow, "m", Duration::from_millis(10));
        assert!((cache.first_frames_of("m")[&slow] - 10.0).abs() < 1e-6);

        // Full of live entries: a new provider is not measured; expired ones make room.
        let cache = ProviderCache::default();
        for i in 0..FIRST_FRAME_ENTRIES {
            cache.first_frame(peer(), &format!("m{i}"), Duration::from_millis(1));
        }
        let newcomer = peer();
        cache.first_frame(newcomer, "m", Duration::from_millis(1));
        assert!(cache.first_frames_of("m").is_empty());
        cache.first_frames().values_mut().next().unwrap().0 =
            Instant::now() - FIRST_FRAME_TTL - Duration::from_millis(1);
        cache.first_frame(newcomer, "m", Duration::from_millis(1));
        assert_eq!(cache.first_frames_of("m").len(), 1);
        assert!(cache.first_frames().len() <= FIRST_FRAME_ENTRIES);
    }
}
