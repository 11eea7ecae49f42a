//! The keys and values of one call, for a range of layers, at half precision (as llama.cpp
//! keeps them).
//!
//! Each key-value head of a layer keeps:
//! - its keys in tiles of [`TILE`] positions, each tile `head_dim` rows of [`TILE`] lanes, so
//!   attention computes the scores of a whole tile with one vector per dimension;
//! - its values as one row of `head_dim` per position.
//!
//! Positions are appended in place; the room for a call's whole length is reserved when the
//! call starts, so nothing moves while it runs.

use std::ops::Range;

use half::f16;

/// Positions per key tile.
pub const TILE: usize = 16;

/// The cache of one layer.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub(crate) head_dim: usize,
    /// Per key-value head: `tiles × head_dim × TILE` keys.
    pub(crate) keys: Vec<Vec<f16>>,
    /// Per key-value head: `len × head_dim` values.
    pub(crate) values: Vec<Vec<f16>>,
    len: usize,
}

impl LayerCache {
    fn new(kv_heads: usize, head_dim: usize, capacity: usize) -> LayerCache {
        LayerCache {
            head_dim,
            keys: (0..kv_heads)
                .map(|_| Vec::with_capacity(capacity.div_ceil(TILE) * TILE * head_dim))
                .collect(),
            values: (0..kv_heads)
                .map(|_| Vec::with_capacity(capacity * head_dim))
                .collect(),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one position: `key` and `value` hold every key-value head side by side.
    pub(crate) fn push(&mut self, key: &[f32], value: &[f32]) {
        let (hd, p) = (self.head_dim, self.len);
        let (tile, lane) = (p / TILE, p % TILE);
        for (g, keys) in self.keys.iter_mut().enumerate() {
            if lane == 0 {
                keys.resize((tile + 1) * hd * TILE, f16::ZERO);
            }
            let dst = &mut keys[tile * hd * TILE..];
            for (d, k) in key[g * hd..][..hd].iter().enumerate() {
                dst[d * TILE + lane] = f16::from_f32(*k);
            }
        }
        for (g, values) in self.values.iter_mut().enumerate() {
            values.extend(value[g * hd..][..hd].iter().map(|v| f16::from_f32(*v)));
        }
        self.len += 1;
    }

    /// Key `d` of position `p` in head `g`.
    pub fn key(&self, g: usize, p: usize, d: usize) -> f32 {
        self.keys[g][(p / TILE * self.head_dim + d) * TILE + p % TILE].to_f32()
    }

    /// Value `d` of position `p` in head `g`.
    pub fn value(&self, g: usize, p: usize, d: usize) -> f32 {
        self.values[g][p * self.head_dim + d].to_f32()
    }

    fn bytes(&self) -> usize {
        let held: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        held * 2
    }

    fn truncate(&mut self, len: usize) {
        let hd = self.head_dim;
        for keys in &mut self.keys {
            keys.truncate(len.div_ceil(TILE) * hd * TILE);
        }
        for values in &mut self.values {
            values.truncate(len * hd);
        }
        self.len = self.len.min(len);
    }

    fn copy_prefix(&self, len: usize, capacity: usize) -> LayerCache {
        let hd = self.head_dim;
        let copy = |src: &Vec<f16>, n: usize, room: usize| {
            let mut v = Vec::with_capacity(room.max(n));
            v.extend_from_slice(&src[..n]);
            v
        };
        let key_room = capacity.div_ceil(TILE) * TILE * hd;
        LayerCache {
            head_dim: hd,
            keys: self
                .keys
                .iter()
                .map(|k| copy(k, len.div_ceil(TILE) * TILE * hd, key_room))
                .collect(),
            values: self
                .values
                .iter()
                .map(|v| copy(v, len * hd, capacity * hd))
                .collect(),
            len,
        }
    }
}

/// Keys and values for the layers `layers`, at positions `0..len()`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Range<usize>,
    len: usize,
    per_layer: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `layers` of `kv_heads` heads of `head_dim`, with room reserved for
    /// `capacity` positions.
    pub fn new(layers: Range<usize>, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let per_layer = layers
            .clone()
            .map(|_| LayerCache::new(kv_heads, head_dim, capacity))
            .collect();
        KvCache {
            layers,
            len: 0,
            per_layer,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.per_layer.iter().map(LayerCache::bytes).sum()
    }

    /// The cache of model layer `layer`.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerCache {
        &mut self.per_layer[layer - self.layers.start]
    }

    /// The cache of model layer `layer`.
    pub fn layer(&self, layer: usize) -> &LayerCache {
        &self.per_layer[layer - self.layers.start]
    }

    /// Records that every layer now holds `len` positions (after a forward over the range).
    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(self.per_layer.iter().all(|l| l.len == len));
        self.len = len;
    }

    /// A copy of the first `len` positions, with room for `capacity` in all.
    pub fn prefix(&self, len: usize, capacity: usize) -> KvCache {
        let len = len.min(self.len);
        KvCache {
            layers: self.layers.clone(),
            len,
            per_layer: self
                .per_layer
                .iter()
                .map(|l| l.copy_prefix(len, capacity))
                .collect(),
        }
    }

    /// Gives back the room reserved beyond the positions held.
    pub fn shrink(&mut self) {
        for l in &mut self.per_layer {
            for v in l.keys.iter_mut().chain(&mut l.values) {
                v.shrink_to_fit();
            }
        }
    }

    /// Forgets the positions from `len` on (also in a layer a failed step left longer).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.per_layer {
            l.truncate(len);
        }
        self.len = self.len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layers 2..4, 2 heads of 3: position p's key is (p, layer, head) by dimension.
    fn filled(positions: usize) -> KvCache {
        let mut c = KvCache::new(2..4, 2, 3, positions);
        for layer in 2..4 {
            for p in 0..positions {
                let key: Vec<f32> = (0..6).map(|i| (p * 100 + layer * 10 + i) as f32).collect();
                let value: Vec<f32> = key.iter().map(|v| -v).collect();
                c.layer_mut(layer).push(&key, &value);
            }
        }
        c.set_len(positions);
        c
    }

    #[test]
    fn positions_are_kept_by_head_in_tiles() {
        let c = filled(20);
        let l = c.layer(3);
        for p in 0..20 {
            for g in 0..2 {
                for d in 0..3 {
                    let want = (p * 100 + 30 + g * 3 + d) as f32;
                    assert_eq!(l.key(g, p, d), want, "key p{p} g{g} d{d}");
                    assert_eq!(l.value(g, p, d), -want);
                }
            }
        }
        // Two tiles of 16 positions × 3 dimensions per head; 20 rows of values.
        assert_eq!(l.keys[0].len(), 2 * TILE * 3);
        assert_eq!(c.bytes(), 2 * 2 * (2 * TILE * 3 + 20 * 3) * 2);
    }

    #[test]
    fn reserved_room_is_used_without_moving() {
        let mut c = KvCache::new(0..1, 1, 4, 40);
        let before = c.layer(0).keys[0].as_ptr();
        for p in 0..40 {
            c.layer_mut(0).push(&[p as f32; 4], &[0.0; 4]);
        }
        c.set_len(40);
        assert_eq!(c.layer(0).keys[0].as_ptr(), before);
    }

    #[test]
    fn a_prefix_copies_the_first_positions_of_every_layer() {
        let c = filled(20);
        let mut p = c.prefix(17, 32);
        assert_eq!((p.len(), p.layers()), (17, 2..4));
        for pos in 0..17 {
            assert_eq!(p.layer(2).key(1, pos, 2), c.layer(2).key(1, pos, 2));
        }
        // It continues where it stopped.
        p.layer_mut(2).push(&[7.0; 6], &[8.0; 6]);
        assert_eq!(p.layer(2).key(0, 17, 1), 7.0);
        assert_eq!(p.layer(2).value(1, 17, 0), 8.0);
        assert_eq!(c.len(), 20, "the original is untouched");
        assert_eq!(c.prefix(99, 0).len(), 20);
    }

    #[test]
    fn truncate_forgets_later_positions() {
        let mut c = filled(20);
        c.truncate(5);
        assert_eq!(c.len(), 5);
        assert_eq!(c.layer(2).values[0].len(), 15);
        c.layer_mut(2).push(&[1.0; 6], &[2.0; 6]);
        assert_eq!(c.layer(2).key(0, 5, 0), 1.0);
        c.truncate(9);
        assert_eq!(c.len(), 5, "truncate never grows");
    }
}
