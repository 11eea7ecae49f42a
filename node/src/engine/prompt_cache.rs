//! Recent calls' key-value caches, so a prompt that repeats or extends an earlier one computes
//! only its new tokens (as llama.cpp's server does for a chat that resends its history).
//!
//! One cache serves the whole node and is bounded in bytes (`--prompt-cache-mib`); the least
//! recently used entry goes first. Entries are keyed by model (its file's hash and the
//! weight format, since both change the numbers) and by token sequence, so nothing is ever
//! shared across models. A lookup copies the matching prefix out, so calls that share a prefix
//! never write to each other's cache.

use std::sync::Mutex;

use super::llama::KvCache;

/// What a lookup found: the tokens reused, and a cache holding them.
pub struct Reused {
    pub tokens: usize,
    pub cache: KvCache,
}

struct Entry {
    model: String,
    tokens: Vec<u32>,
    cache: KvCache,
    used: u64,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// The node's prompt cache.
pub struct PromptCache {
    budget: usize,
    inner: Mutex<Inner>,
}

/// Counters, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub budget: usize,
    pub hits: u64,
    pub misses: u64,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PromptCache {
    /// A cache of at most `budget` bytes; 0 turns it off.
    pub fn new(budget: usize) -> PromptCache {
        PromptCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is whole).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest cached prefix of `prompt` for `model`, copied into a cache with room for
    /// `capacity` positions. At least one prompt token is always left to compute, since its
    /// logits are what the call samples from.
    pub fn lookup(&self, model: &str, prompt: &[u32], capacity: usize) -> Option<Reused> {
        if self.budget == 0 {
            return None;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let best = inner
            .entries
            .iter_mut()
            .filter(|e| e.model == model)
            .map(|e| (common_prefix(&e.tokens, prompt).min(prompt.len() - 1), e))
            .filter(|(n, _)| *n > 0)
            .max_by_key(|(n, e)| (*n, e.used));
        match best {
            Some((n, entry)) => {
                entry.used = clock;
                let cache = entry.cache.prefix(n, capacity);
                inner.hits += 1;
                Some(Reused { tokens: n, cache })
            }
            None => {
                inner.misses += 1;
                None
            }
        }
    }

    /// Keeps `cache`, which holds the positions of `tokens`, for later calls to `model`.
    /// Entries it extends are dropped; then the least recently used go until it fits.
    pub fn store(&self, model: &str, tokens: &[u32], mut cache: KvCache) {
        debug_assert_eq!(tokens.len(), cache.len());
        cache.shrink();
        let size = cache.bytes();
        if self.budget == 0 || size > self.budget || cache.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let used = inner.clock;
        let mut freed = 0;
        inner.entries.retain(|e| {
            let superseded = e.model == model && tokens.starts_with(&e.tokens);
            if superseded {
                freed += e.cache.bytes();
            }
            !superseded
        });
        inner.bytes -= freed;
        // An entry that already holds all of these tokens makes this one redundant.
        if let Some(e) = inner
            .entries
            .iter_mut()
            .find(|e| e.model == model && e.tokens.starts_with(tokens))
        {
            e.used = used;
            return;
        }
        while inner.bytes + size > self.budget {
            let Some(oldest) = (0..inner.entries.len()).min_by_key(|i| inner.entries[*i].used)
            else {
                break;
            };
            let gone = inner.entries.swap_remove(oldest);
            inner.bytes -= gone.cache.bytes();
        }
        inner.bytes += size;
        inner.entries.push(Entry {
            model: model.to_string(),
            tokens: tokens.to_vec(),
            cache,
            used,
        });
    }

    pub fn stats(&self) -> PromptCacheStats {
        let inner = self.lock();
        PromptCacheStats {
            entries: inner.entries.len(),
            bytes: inner.bytes,
            budget: self.budget,
            hits: inner.hits,
            misses: inner.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::llama::KvCache;

    /// A cache of `tokens.len()` positions whose rows record the token at each position.
    fn cache_of(tokens: &[u32]) -> KvCache {
        let mut c = KvCache::new(0..1, 1, 2, tokens.len());
        for t in tokens {
            c.layer_mut(0).push(&[*t as f32, 0.0], &[0.0, *t as f32]);
        }
        c.set_len(tokens.len());
        c
    }

    /// Bytes of a cache of `n` positions made by `cache_of`.
    fn size(n: usize) -> usize {
        cache_of(&vec![0; n]).bytes()
    }

    #[test]
    fn a_repeated_or_extended_prompt_reuses_the_common_prefix() {
        let pc = PromptCache::new(1 << 20);
        pc.store("m", &[1, 2, 3, 4], cache_of(&[1, 2, 3, 4]));
        // The same prompt again: all but the last token.
        let r = pc.lookup("m", &[1, 2, 3, 4], 10).unwrap();
        assert_eq!(r.tokens, 3);
        assert_eq!(r.cache.len(), 3);
        // An extension: the whole stored sequence.
        let r = pc.lookup("m", &[1, 2, 3, 4, 5, 6], 10).unwrap();
        assert_eq!(r.tokens, 4);
        let keys: Vec<f32> = (0..4).map(|p| r.cache.layer(0).key(0, p, 0)).collect();
        assert_eq!(keys, vec![1., 2., 3., 4.]);
        // A divergence after two tokens.
        assert_eq!(pc.lookup("m", &[1, 2, 9], 10).unwrap().tokens, 2);
        assert!(pc.lookup("m", &[7, 8], 10).is_none());
        assert_eq!(pc.stats().hits, 3);
        assert_eq!(pc.stats().misses, 1);
    }

    #[test]
    fn models_never_share_entries() {
        let pc = PromptCache::new(1 << 20);
        pc.store("a", &[1, 2, 3], cache_of(&[1, 2, 3]));
        assert!(pc.lookup("b", &[1, 2, 3, 4], 10).is_none());
        assert!(pc.lookup("a", &[1, 2, 3, 4], 10).is_some());
    }

    #[test]
    fn an_extension_replaces_the_entry_it_extends() {
        let pc = PromptCache::new(1 << 20);
        pc.store("m", &[1, 2], cache_of(&[1, 2]));
        pc.store("m", &[1, 2, 3, 4], cache_of(&[1, 2, 3, 4]));
        assert_eq!(pc.stats().entries, 1);
        assert_eq!(pc.stats().bytes, size(4));
        // A shorter sequence already covered is not stored again.
        pc.store("m", &[1, 2, 3], cache_of(&[1, 2, 3]));
        assert_eq!(pc.stats().entries, 1);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let pc = PromptCache::new(3 * size(2));
        pc.store("m", &[1, 1], cache_of(&[1, 1]));
        pc.store("m", &[2, 2], cache_of(&[2, 2]));
        pc.store("m", &[3, 3], cache_of(&[3, 3]));
        // Touch [1, 1]; then a fourth entry pushes out [2, 2], the least recently used.
        pc.lookup("m", &[1, 1, 5], 4).unwrap();
        pc.store("m", &[4, 4], cache_of(&[4, 4]));
        assert!(pc.stats().bytes <= 3 * size(2));
        assert!(pc.lookup("m", &[2, 2, 5], 4).is_none());
        assert!(pc.lookup("m", &[1, 1, 5], 4).is_some());
        assert!(pc.lookup("m", &[4, 4, 5], 4).is_some());
        // An entry larger than the whole budget is not kept.
        assert!(size(100) > 3 * size(2));
        pc.store("m", &[9; 100], cache_of(&[9; 100]));
        assert!(pc.lookup("m", &[9; 101], 101).is_none());
        // A budget of 0 turns the cache off.
        let off = PromptCache::new(0);
        off.store("m", &[1, 2], cache_of(&[1, 2]));
        assert!(off.lookup("m", &[1, 2, 3], 4).is_none());
    }
}
