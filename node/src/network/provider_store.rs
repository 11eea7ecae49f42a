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
//! is never given up. A flood of fresh records from throwaway peer ids can still push others
//! out, as it could fill the list before; bounding what one peer or address may announce is
//! the hostile-peers work.

use std::borrow::Cow;

use libp2p::kad::store::{MemoryStore, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

pub struct ProviderStore {
    inner: MemoryStore,
    local: PeerId,
    max_providers_per_key: usize,
}

impl ProviderStore {
    pub fn new(local: PeerId, config: libp2p::kad::store::MemoryStoreConfig) -> ProviderStore {
        let max_providers_per_key = config.max_providers_per_key;
        ProviderStore {
            inner: MemoryStore::with_config(local, config),
            local,
            max_providers_per_key,
        }
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let providers = self.inner.providers(&record.key);
        let known = providers.iter().any(|p| p.provider == record.provider);
        if !known && providers.len() >= self.max_providers_per_key {
            let stalest = providers
                .iter()
                .filter(|p| p.provider != self.local)
                .min_by_key(|p| p.expires);
            if let Some(stalest) = stalest {
                self.inner.remove_provider(&record.key, &stalest.provider);
            }
        }
        self.inner.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p)
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
}
