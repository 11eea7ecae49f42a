//! One hosted model and its admission control.
//!
//! A model admits at most `capacity` calls (its slots plus the queue) at once, counted
//! lock-free: a call beyond that is refused `overloaded` at once instead of waiting. An
//! admitted call then waits, up to its deadline, for one of the model's slots
//! (`max_concurrency` of its card). Both are held until the call's compute really stops.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mesh_protocol::{ModelCard, SignedModelCard};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::SharedEngine;

/// One hosted model with its admission control.
pub struct HostedModel {
    pub(super) engine: SharedEngine,
    /// The card as sent in catalogs, signed by the node.
    pub(super) signed_card: SignedModelCard,
    /// One permit per call that may compute at once.
    slots: Arc<Semaphore>,
    /// Calls admitted (computing or waiting for a slot).
    admitted: Arc<AtomicUsize>,
    /// Most calls admitted at once: slots plus queue.
    capacity: usize,
    /// How many times the engine was started.
    runs: AtomicU64,
}

/// One admitted call; releases its place when dropped.
pub(super) struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HostedModel {
    /// `engine` with its signed card, admitting `max_queue` calls beyond its slots.
    pub(super) fn new(
        engine: SharedEngine,
        signed_card: SignedModelCard,
        max_queue: usize,
    ) -> HostedModel {
        let slots = engine.card().max_concurrency as usize;
        HostedModel {
            engine,
            signed_card,
            slots: Arc::new(Semaphore::new(slots)),
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: slots + max_queue,
            runs: AtomicU64::new(0),
        }
    }

    pub fn card(&self) -> &ModelCard {
        self.engine.card()
    }

    /// Admits one more call, or `None` if `capacity` calls are already admitted.
    pub(super) fn try_admit(&self) -> Option<Admission> {
        let mut current = self.admitted.load(Ordering::Acquire);
        loop {
            if current >= self.capacity {
                return None;
            }
            match self.admitted.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Admission(self.admitted.clone())),
                Err(now) => current = now,
            }
        }
    }

    /// Waits for a free slot. The semaphore is never closed, so this only ever waits.
    pub(super) async fn slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed")
    }

    /// Most calls admitted at once.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Calls admitted now (computing or waiting for a slot).
    pub(super) fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Slots computing a call now.
    pub(super) fn busy(&self) -> usize {
        (self.card().max_concurrency as usize).saturating_sub(self.slots.available_permits())
    }

    /// Counts one start of the engine.
    pub(super) fn count_run(&self) {
        self.runs.fetch_add(1, Ordering::AcqRel);
    }

    /// How many times the engine was started.
    pub(super) fn runs(&self) -> u64 {
        self.runs.load(Ordering::Acquire)
    }
}
