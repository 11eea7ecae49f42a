//! The keys and values of one call, for a range of layers.
//!
//! Each layer keeps its keys and values as rows of `kv_heads · head_dim` floats, one row per
//! position, appended in place. Nothing is copied when a token is added, and grouped-query
//! attention reads each key-value head where it lies. The room for the call's whole length is
//! reserved when the call starts, so the buffers do not move while it runs.

use std::ops::Range;

/// The cache of one layer: `len` rows of keys and of values.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub(crate) keys: Vec<f32>,
    pub(crate) values: Vec<f32>,
}

/// Keys and values for the layers `layers`, at positions `0..len()`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Range<usize>,
    width: usize,
    len: usize,
    per_layer: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `layers`, with rows of `width` floats (`kv_heads · head_dim`) and
    /// room reserved for `capacity` positions.
    pub fn new(layers: Range<usize>, width: usize, capacity: usize) -> KvCache {
        let per_layer = layers
            .clone()
            .map(|_| LayerCache {
                keys: Vec::with_capacity(capacity * width),
                values: Vec::with_capacity(capacity * width),
            })
            .collect();
        KvCache {
            layers,
            width,
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

    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of keys and values held (not counting spare capacity).
    pub fn bytes(&self) -> usize {
        self.len * self.width * 2 * 4 * self.per_layer.len()
    }

    /// Makes room for `more` positions beyond those held.
    pub fn reserve(&mut self, more: usize) {
        for l in &mut self.per_layer {
            l.keys.reserve(more * self.width);
            l.values.reserve(more * self.width);
        }
    }

    /// The cache of model layer `layer`.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerCache {
        &mut self.per_layer[layer - self.layers.start]
    }

    /// Records that every layer now holds `len` positions (after a forward over the range).
    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(self
            .per_layer
            .iter()
            .all(|l| l.keys.len() == len * self.width));
        self.len = len;
    }

    /// A copy of the first `len` positions, with room for `capacity` in all.
    pub fn prefix(&self, len: usize, capacity: usize) -> KvCache {
        let len = len.min(self.len);
        let n = len * self.width;
        let per_layer = self
            .per_layer
            .iter()
            .map(|l| {
                let mut keys = Vec::with_capacity(capacity.max(len) * self.width);
                keys.extend_from_slice(&l.keys[..n]);
                let mut values = Vec::with_capacity(capacity.max(len) * self.width);
                values.extend_from_slice(&l.values[..n]);
                LayerCache { keys, values }
            })
            .collect();
        KvCache {
            layers: self.layers.clone(),
            width: self.width,
            len,
            per_layer,
        }
    }

    /// Gives back the room reserved beyond the positions held.
    pub fn shrink(&mut self) {
        for l in &mut self.per_layer {
            l.keys.shrink_to_fit();
            l.values.shrink_to_fit();
        }
    }

    /// Forgets the positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for l in &mut self.per_layer {
            l.keys.truncate(len * self.width);
            l.values.truncate(len * self.width);
        }
        self.len = len;
    }
}

impl LayerCache {
    /// Appends one position's key and value rows.
    pub(crate) fn push(&mut self, key: &[f32], value: &[f32]) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(positions: usize) -> KvCache {
        let mut c = KvCache::new(2..4, 3, positions);
        for layer in 2..4 {
            for p in 0..positions {
                let row = [p as f32, layer as f32, 1.0];
                c.layer_mut(layer).push(&row, &row.map(|v| -v));
            }
        }
        c.set_len(positions);
        c
    }

    #[test]
    fn rows_append_in_place_without_moving() {
        let mut c = KvCache::new(0..1, 4, 10);
        let before = c.layer_mut(0).keys.as_ptr();
        for p in 0..10 {
            c.layer_mut(0).push(&[p as f32; 4], &[0.0; 4]);
        }
        c.set_len(10);
        assert_eq!(
            c.layer_mut(0).keys.as_ptr(),
            before,
            "reserved room is used"
        );
        assert_eq!(c.bytes(), 10 * 4 * 2 * 4);
    }

    #[test]
    fn a_prefix_copies_the_first_positions_of_every_layer() {
        let c = filled(5);
        let mut p = c.prefix(3, 8);
        assert_eq!(p.len(), 3);
        assert_eq!(p.layers(), 2..4);
        assert_eq!(
            p.layer_mut(3).keys,
            vec![0., 3., 1., 1., 3., 1., 2., 3., 1.]
        );
        assert_eq!(p.layer_mut(2).values[3..6], [-1., -2., -1.]);
        assert!(p.layer_mut(2).keys.capacity() >= 8 * 3);
        // The original is untouched.
        assert_eq!(c.len(), 5);
        assert_eq!(c.prefix(99, 0).len(), 5);
    }

    #[test]
    fn truncate_forgets_later_positions() {
        let mut c = filled(5);
        c.truncate(2);
        assert_eq!(c.len(), 2);
        assert_eq!(c.layer_mut(2).keys.len(), 6);
        c.truncate(4);
        assert_eq!(c.len(), 2, "truncate never grows");
    }
}
