//! Trying a hole punch again after it failed.
//!
//! DCUtR tries to punch when a relayed connection opens, three times within a few seconds, and
//! then never again on that connection. A punch between two cone NATs can still fail now and
//! then (the NAT lab sees the two SYNs of a simultaneous open cross a router's rules out of
//! turn), and the pair would then stay relayed for as long as the connection lives: a split
//! head, which runs no stage over a relay by default, would never use that stage. So the node
//! that opened the relayed connection opens another one through the relay a while later, which
//! makes DCUtR try again: after 5 s, then twice as long each time, at most [`MAX_RETRIES`]
//! times, until a punch works or the peer is gone. Through a symmetric NAT the retries fail
//! too, and cost one relayed connection each, spaced out.
//!
//! Plain bookkeeping: the swarm task reports punches and disconnections and dials what
//! [`Repunch::due`] returns (see `event_loop`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The wait before the first retry; each later one waits twice as long.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Retries after the first failure, at most (5 s to 160 s after it: about 5 minutes in all).
pub const MAX_RETRIES: u32 = 6;
/// Peers whose punches are retried at once, at most.
const MAX_PEERS: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    /// Retries made so far.
    made: u32,
}

#[derive(Debug, Default)]
pub struct Repunch {
    retries: HashMap<PeerId, Retry>,
}

impl Repunch {
    /// A hole punch to `peer` failed: schedules the next retry, if any is left.
    pub fn failed(&mut self, peer: PeerId, now: Instant) {
        let made = self.retries.get(&peer).map_or(0, |r| r.made);
        if made >= MAX_RETRIES {
            self.retries.remove(&peer);
            return;
        }
        if !self.retries.contains_key(&peer) && self.retries.len() >= MAX_PEERS {
            return;
        }
        let wait = FIRST_RETRY.saturating_mul(1 << made.min(16));
        self.retries.insert(
            peer,
            Retry {
                at: now + wait,
                made,
            },
        );
    }

    /// A hole punch to `peer` worked, or `peer` is gone: nothing more to retry.
    pub fn done(&mut self, peer: &PeerId) {
        self.retries.remove(peer);
    }

    /// When the next retry is due, if one is scheduled.
    pub fn next_due(&self) -> Option<Instant> {
        self.retries.values().map(|r| r.at).min()
    }

    /// The peers whose retry is due now. Each counts as made; until DCUtR reports its outcome
    /// (which schedules the next), it is not due again.
    pub fn due(&mut self, now: Instant) -> Vec<PeerId> {
        let mut out = Vec::new();
        for (peer, retry) in &mut self.retries {
            if retry.at <= now {
                out.push(*peer);
                retry.made += 1;
                // Should no outcome come (the new connection failed), try again later.
                retry.at = now + FIRST_RETRY.saturating_mul(1 << retry.made.min(16));
            }
        }
        self.retries.retain(|_, r| r.made <= MAX_RETRIES);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_peer as peer;

    #[test]
    fn retries_wait_twice_as_long_each_time_and_stop() {
        let mut repunch = Repunch::default();
        let (p, t0) = (peer(), Instant::now());
        repunch.failed(p, t0);
        assert_eq!(repunch.next_due(), Some(t0 + FIRST_RETRY));
        assert!(repunch.due(t0).is_empty(), "not yet");
        let mut now = t0 + FIRST_RETRY;
        let mut waits = Vec::new();
        loop {
            let due = repunch.due(now);
            if due.is_empty() {
                break;
            }
            assert_eq!(due, vec![p]);
            assert!(repunch.due(now).is_empty(), "not due twice");
            // The retry's punch fails too.
            repunch.failed(p, now);
            let Some(next) = repunch.next_due() else {
                break;
            };
            waits.push(next - now);
            now = next;
        }
        assert_eq!(
            waits,
            (1..MAX_RETRIES)
                .map(|n| FIRST_RETRY * (1 << n))
                .collect::<Vec<_>>()
        );
        assert_eq!(repunch.next_due(), None, "given up after {MAX_RETRIES}");
    }

    #[test]
    fn a_punch_that_works_or_a_peer_that_leaves_ends_the_retries() {
        let mut repunch = Repunch::default();
        let (a, b, t0) = (peer(), peer(), Instant::now());
        repunch.failed(a, t0);
        repunch.failed(b, t0);
        repunch.done(&a);
        assert_eq!(repunch.due(t0 + FIRST_RETRY), vec![b]);
        repunch.done(&b);
        assert_eq!(repunch.next_due(), None);
    }

    #[test]
    fn a_retry_without_an_outcome_is_due_again_later_and_peers_are_bounded() {
        let mut repunch = Repunch::default();
        let (p, t0) = (peer(), Instant::now());
        repunch.failed(p, t0);
        assert_eq!(repunch.due(t0 + FIRST_RETRY), vec![p]);
        let again = repunch.next_due().unwrap();
        assert_eq!(again, t0 + FIRST_RETRY + FIRST_RETRY * 2);
        assert_eq!(repunch.due(again), vec![p]);

        let mut many = Repunch::default();
        for _ in 0..MAX_PEERS + 10 {
            many.failed(peer(), t0);
        }
        assert_eq!(many.retries.len(), MAX_PEERS);
    }
}
