//! The Kademlia record store: libp2p's `MemoryStore`, except for what happens when a model's
//! provider list is full.
//!
//! `MemoryStore` ignores a new provider once a key holds `max_providers_per_key` records. A
//! provider that leaves (or is killed) keeps its slot until its record expires (the provider
//! TTL, 15 minutes), so on a mesh where nodes come and go the slots fill with departed nodes
//! and every new provider of the model is ignored: `any` finds only the dead ones. The churn
//! soak (`testnet/soak.sh`) showed exactly this after about 100 departures.
//!
//! Here a new provider of a full key takes the slot of the record refreshed longest ago (the
//! one that expires first). A live provider republishes every third of the TTL, so its record
//! stays fresh; a departed one stops, so its record is the first to go. The node's own record
//! is never given up.
//!
//! What a remote peer announces is bounded, so that no peer can fill the store:
//!
//! - the node's own records live apart from remote ones ([`ProviderStore`] holds two
//!   `MemoryStore`s), so remote keys filling the store never stop the node announcing its own;
//! - one remote peer provides at most [`MAX_KEYS_PER_PROVIDER`] keys here;
//! - a record keeps at most [`MAX_ADDRESSES_PER_RECORD`] addresses (the packet may carry
//!   hundreds; mesh raised Kademlia's packet size for long provider lists).
//!
//! A flood of fresh records from many throwaway peer ids can still push others out of one
//! key's list, as it could fill the list before; the per-IP connection caps bound how many
//! peer ids one machine brings.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use libp2p::kad::store::{Error, MemoryStore, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

/// Most keys one remote peer provides in this store.
pub const MAX_KEYS_PER_PROVIDER: usize = 32;
/// Most addresses kept with one provider record.
pub const MAX_ADDRESSES_PER_RECORD: usize = 8;

pub struct ProviderStore {
    /// This node's own provider records.
    own: MemoryStore,
    /// Everyone else's, and value records.
    remote: MemoryStore,
    local: PeerId,
    max_providers_per_key: usize,
    /// The keys each remote peer provides here (some may have expired or been pushed out:
    /// they are pruned when the peer is next counted).
    by_provider: HashMap<PeerId, HashSet<RecordKey>>,
}

impl ProviderStore {
    pub fn new(local: PeerId, config: libp2p::kad::store::MemoryStoreConfig) -> ProviderStore {
        let max_providers_per_key = config.max_providers_per_key;
        ProviderStore {
            own: MemoryStore::with_config(local, config.clone()),
            remote: MemoryStore::with_config(local, config),
            local,
            max_providers_per_key,
            by_provider: HashMap::new(),
        }
    }

    /// The live keys `peer` provides here, pruning those whose record is gone or expired.
    fn keys_of(&mut self, peer: &PeerId) -> usize {
        let now = Instant::now();
        let Some(keys) = self.by_provider.get_mut(peer) else {
            return 0;
        };
        let remote = &self.remote;
        keys.retain(|key| {
            remote
                .providers(key)
                .iter()
                .any(|r| r.provider == *peer && !r.is_expired(now))
        });
        let n = keys.len();
        if n == 0 {
            self.by_provider.remove(peer);
        }
        n
    }

    fn add_remote(&mut self, mut record: ProviderRecord) -> Result<()> {
        record.addresses.truncate(MAX_ADDRESSES_PER_RECORD);
        let providers = self.remote.providers(&record.key);
        let known = providers.iter().any(|p| p.provider == record.provider);
        if !known && self.keys_of(&record.provider) >= MAX_KEYS_PER_PROVIDER {
            return Err(Error::MaxProvidedKeys);
        }
        if !known && providers.len() >= self.max_providers_per_key {
            if let Some(stalest) = providers.iter().min_by_key(|p| p.expires) {
                self.remote.remove_provider(&record.key, &stalest.provider);
            }
        }
        let (key, provider) = (record.key.clone(), record.provider);
        self.remote.add_provider(record)?;
        self.by_provider.entry(provider).or_default().insert(key);
        Ok(())
    }
}

impl ProviderStore {
    /// What the store holds now (expired records not counted), for `/v1/mesh/status`.
    pub fn stats(&self) -> super::DhtStore {
        let now = Instant::now();
        let keys: HashSet<&RecordKey> = self.by_provider.values().flatten().collect();
        let mut of_provider: HashMap<PeerId, usize> = HashMap::new();
        let mut stats = super::DhtStore {
            own_keys: self.own.provided().count(),
            ..Default::default()
        };
        for key in keys {
            for record in self.remote.providers(key) {
                if record.is_expired(now) {
                    continue;
                }
                *of_provider.entry(record.provider).or_default() += 1;
                stats.remote_records += 1;
                stats.remote_addresses += record.addresses.len();
                stats.most_addresses_in_one_record = stats
                    .most_addresses_in_one_record
                    .max(record.addresses.len());
            }
        }
        stats.remote_providers = of_provider.len();
        stats.most_keys_of_one_provider = of_provider.values().copied().max().unwrap_or(0);
        stats
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.remote.get(k)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        self.remote.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.remote.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.remote.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        if record.provider == self.local {
            self.own.add_provider(record)
        } else {
            self.add_remote(record)
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut all = self.own.providers(key);
        all.extend(self.remote.providers(key));
        all
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        if *p == self.local {
            self.own.remove_provider(k, p)
        } else {
            self.remote.remove_provider(k, p);
            if let Some(keys) = self.by_provider.get_mut(p) {
                keys.remove(k);
                if keys.is_empty() {
                    self.by_provider.remove(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::test_support::random_peer;

    fn record(key: &RecordKey, provider: PeerId, expires_in_s: u64) -> ProviderRecord {
        ProviderRecord {
            key: key.clone(),
            provider,
            expires: Some(Instant::now() + Duration::from_secs(expires_in_s)),
            addresses: vec![],
        }
    }

    fn store(local: PeerId, max: usize) -> ProviderStore {
        ProviderStore::new(
            local,
            libp2p::kad::store::MemoryStoreConfig {
                max_providers_per_key: max,
                ..Default::default()
            },
        )
    }

    fn holders(store: &ProviderStore, key: &RecordKey) -> Vec<PeerId> {
        let mut p: Vec<PeerId> = store.providers(key).iter().map(|r| r.provider).collect();
        p.sort();
        p
    }

    #[test]
    fn a_new_provider_of_a_full_key_replaces_the_stalest_record() {
        let key = RecordKey::new(&"/mesh/model/1/echo");
        let mut s = store(random_peer(), 3);
        let (left_long_ago, left, live, newcomer) =
            (random_peer(), random_peer(), random_peer(), random_peer());
        s.add_provider(record(&key, left_long_ago, 60)).unwrap();
        s.add_provider(record(&key, left, 300)).unwrap();
        s.add_provider(record(&key, live, 900)).unwrap();
        s.add_provider(record(&key, newcomer, 900)).unwrap();
        let mut want = vec![left, live, newcomer];
        want.sort();
        assert_eq!(holders(&s, &key), want);

        // A provider already listed refreshes its record in place: nobody is evicted.
        s.add_provider(record(&key, left, 900)).unwrap();
        assert_eq!(holders(&s, &key), want);
        // Now `live` is the stalest (the earliest expiry, with `left` refreshed).
        let another = random_peer();
        s.add_provider(record(&key, another, 900)).unwrap();
        assert!(!holders(&s, &key).contains(&live));
        assert!(holders(&s, &key).contains(&another));
    }

    #[test]
    fn the_nodes_own_record_is_never_given_up() {
        let key = RecordKey::new(&"/mesh/model/1/echo");
        let me = random_peer();
        let mut s = store(me, 2);
        s.add_provider(record(&key, me, 1)).unwrap();
        s.add_provider(record(&key, random_peer(), 900)).unwrap();
        let newcomer = random_peer();
        s.add_provider(record(&key, newcomer, 900)).unwrap();
        let held = holders(&s, &key);
        assert!(held.contains(&me) && held.contains(&newcomer), "{held:?}");
        assert_eq!(s.provided().count(), 1);
    }

    #[test]
    fn one_remote_peer_provides_a_bounded_number_of_keys_and_its_addresses_are_capped() {
        let me = random_peer();
        let mut s = store(me, 100);
        let greedy = random_peer();
        let key = |n: usize| RecordKey::new(&format!("/mesh/model/1/m{n}"));
        for n in 0..MAX_KEYS_PER_PROVIDER {
            let mut r = record(&key(n), greedy, 900);
            r.addresses = (0..500)
                .map(|port| format!("/ip4/192.0.2.1/tcp/{port}").parse().unwrap())
                .collect();
            s.add_provider(r).unwrap();
        }
        assert!(matches!(
            s.add_provider(record(&key(999), greedy, 900)),
            Err(Error::MaxProvidedKeys)
        ));
        assert!(s.providers(&key(0))[0].addresses.len() <= MAX_ADDRESSES_PER_RECORD);
        let stats = s.stats();
        assert_eq!(stats.remote_providers, 1);
        assert_eq!(stats.remote_records, MAX_KEYS_PER_PROVIDER);
        assert_eq!(stats.most_keys_of_one_provider, MAX_KEYS_PER_PROVIDER);
        assert_eq!(stats.most_addresses_in_one_record, MAX_ADDRESSES_PER_RECORD);
        assert_eq!(
            stats.remote_addresses,
            MAX_KEYS_PER_PROVIDER * MAX_ADDRESSES_PER_RECORD
        );
        assert_eq!(stats.own_keys, 0);
        // A refresh of a key it has is fine; another peer is not held back.
        s.add_provider(record(&key(0), greedy, 900)).unwrap();
        s.add_provider(record(&key(999), random_peer(), 900))
            .unwrap();
        // A record that expired frees its place.
        s.add_provider(record(&key(1), greedy, 0)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        s.add_provider(record(&key(1000), greedy, 900)).unwrap();
    }

    #[test]
    fn remote_keys_filling_the_store_leave_room_for_the_nodes_own() {
        let me = random_peer();
        let mut s = ProviderStore::new(
            me,
            libp2p::kad::store::MemoryStoreConfig {
                max_provided_keys: 4,
                ..Default::default()
            },
        );
        for n in 0..4 {
            let key = RecordKey::new(&format!("/mesh/model/1/r{n}"));
            s.add_provider(record(&key, random_peer(), 900)).unwrap();
        }
        let full = RecordKey::new(&"/mesh/model/1/one-more");
        assert!(s.add_provider(record(&full, random_peer(), 900)).is_err());
        let mine = RecordKey::new(&"/mesh/model/1/mine");
        s.add_provider(record(&mine, me, 900)).unwrap();
        assert_eq!(holders(&s, &mine), vec![me]);
        assert_eq!(s.provided().count(), 1);
        s.remove_provider(&mine, &me);
        assert_eq!(s.provided().count(), 0);
    }
}
