//! Which pieces of a pull go to which peer: plain bookkeeping, tested without a network.
//!
//! Every peer asks for runs of consecutive pieces still missing. A faster peer gets longer runs
//! (up to 16 pieces), a slower one shorter (down to 1), by its measured rate against the best,
//! so the fast peers carry the bulk and a slow one never holds the tail for long. When nothing
//! is left to hand out, an idle peer takes a run still in flight elsewhere (the end game): the
//! first copy to verify wins. A peer that sent a bad piece is backed off (30 s, doubling per
//! strike); one whose stream failed, briefly (2 s, growing with each failure in a row).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh_protocol::blob::MAX_PIECES_PER_REQUEST;

/// How long a peer that sent a bad piece is left alone, doubled for each strike after.
pub const LIAR_BACKOFF: Duration = Duration::from_secs(30);
/// How long a peer whose stream failed is left alone (times its failures in a row, up to 8).
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone)]
struct PeerState {
    bytes: u64,
    busy: Duration,
    strikes: u32,
    failures: u32,
    until: Option<Instant>,
    pieces: u64,
}

impl PeerState {
    /// Bytes a second measured so far (`None` before the first run).
    fn rate(&self) -> Option<f64> {
        (self.bytes > 0 && !self.busy.is_zero())
            .then(|| self.bytes as f64 / self.busy.as_secs_f64())
    }
}

/// A run handed out: `count` pieces from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub count: u32,
}

/// How a peer's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every piece verified.
    Done { bytes: u64, took: Duration },
    /// A piece did not verify, or the answer was malformed: a strike.
    Lied,
    /// The stream or the connection failed, or the peer refused.
    Failed,
}

#[derive(Debug)]
pub struct Schedule {
    pieces: u64,
    done: Vec<bool>,
    left: u64,
    /// Pieces handed out and not yet in, with how many copies are in flight.
    in_flight: HashMap<u64, u32>,
    peers: HashMap<PeerId, PeerState>,
}

impl Schedule {
    /// A pull of `pieces` pieces, of which those in `have` are already here (a resumed pull).
    pub fn new(pieces: u64, have: &HashSet<u64>) -> Schedule {
        let done: Vec<bool> = (0..pieces).map(|i| have.contains(&i)).collect();
        let left = done.iter().filter(|d| !**d).count() as u64;
        Schedule {
            pieces,
            done,
            left,
            in_flight: HashMap::new(),
            peers: HashMap::new(),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.left == 0
    }

    pub fn left(&self) -> u64 {
        self.left
    }

    /// Pieces each peer delivered (first copies only).
    pub fn delivered(&self) -> HashMap<PeerId, u64> {
        self.peers.iter().map(|(p, s)| (*p, s.pieces)).collect()
    }

    /// Whether `peer` is backed off at `now`.
    pub fn backed_off(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers
            .get(peer)
            .and_then(|s| s.until)
            .is_some_and(|until| until > now)
    }

    /// When `peer`'s back-off ends, if it is backed off.
    pub fn back_until(&self, peer: &PeerId) -> Option<Instant> {
        self.peers.get(peer).and_then(|s| s.until)
    }

    /// The run size for `peer`: 16 pieces for the fastest, fewer for a slower one.
    fn run_len(&self, peer: &PeerId) -> u32 {
        let best = self
            .peers
            .values()
            .filter_map(PeerState::rate)
            .fold(0.0, f64::max);
        match self.peers.get(peer).and_then(PeerState::rate) {
            Some(rate) if best > 0.0 => {
                let share = (rate / best * f64::from(MAX_PIECES_PER_REQUEST)).round();
                (share as u32).clamp(1, MAX_PIECES_PER_REQUEST)
            }
            _ => MAX_PIECES_PER_REQUEST / 2,
        }
    }

    /// The next run for `peer` at `now`, if it is not backed off and something is left.
    pub fn next_run(&mut self, peer: PeerId, now: Instant) -> Option<Run> {
        if self.backed_off(&peer, now) || self.is_complete() {
            return None;
        }
        let len = self.run_len(&peer);
        self.peers.entry(peer).or_default();
        // A run of pieces nobody has taken; else, in the end game, of pieces one peer has.
        let missing = |i: &u64| !self.done[*i as usize];
        let first = (0..self.pieces)
            .find(|i| missing(i) && !self.in_flight.contains_key(i))
            .or_else(|| {
                (0..self.pieces).find(|i| missing(i) && self.in_flight.get(i) == Some(&1))
            })?;
        let endgame = self.in_flight.contains_key(&first);
        let mut count = 0u32;
        let mut i = first;
        while count < len && i < self.pieces && !self.done[i as usize] {
            let copies = self.in_flight.get(&i).copied().unwrap_or(0);
            if (copies > 0) != endgame || copies > 1 {
                break;
            }
            *self.in_flight.entry(i).or_default() += 1;
            count += 1;
            i += 1;
        }
        Some(Run { first, count })
    }

    /// Piece `index` arrived verified from `peer`: true if it was still missing (write it).
    pub fn arrived(&mut self, peer: PeerId, index: u64) -> bool {
        let Some(done) = self.done.get_mut(index as usize) else {
            return false;
        };
        if *done {
            return false;
        }
        *done = true;
        self.left -= 1;
        self.peers.entry(peer).or_default().pieces += 1;
        true
    }

    /// `peer`'s run ended with `outcome` at `now`: its pieces not in are handed out again.
    pub fn ended(&mut self, peer: PeerId, run: Run, outcome: Outcome, now: Instant) {
        for i in run.first..run.first + u64::from(run.count) {
            if let Some(copies) = self.in_flight.get_mut(&i) {
                *copies -= 1;
                if *copies == 0 {
                    self.in_flight.remove(&i);
                }
            }
        }
        let state = self.peers.entry(peer).or_default();
        match outcome {
            Outcome::Done { bytes, took } => {
                state.bytes += bytes;
                state.busy += took;
                state.failures = 0;
            }
            Outcome::Lied => {
                state.strikes += 1;
                let doubling = 2u32.saturating_pow(state.strikes - 1).min(64);
                state.until = Some(now + LIAR_BACKOFF * doubling);
            }
            Outcome::Failed => {
                state.failures += 1;
                state.until = Some(now + FAILURE_BACKOFF * state.failures.min(8));
            }
        }
    }

    /// Strikes against `peer` (bad answers it sent).
    pub fn strikes(&self, peer: &PeerId) -> u32 {
        self.peers.get(peer).map_or(0, |s| s.strikes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_peer;

    fn run_all(s: &mut Schedule, peer: PeerId, run: Run, took_ms: u64) {
        for i in run.first..run.first + u64::from(run.count) {
            s.arrived(peer, i);
        }
        let outcome = Outcome::Done {
            bytes: u64::from(run.count) * 262_144,
            took: Duration::from_millis(took_ms),
        };
        s.ended(peer, run, outcome, Instant::now());
    }

    #[test]
    fn peers_share_the_pieces_and_the_faster_gets_longer_runs() {
        let (fast, slow) = (random_peer(), random_peer());
        let mut s = Schedule::new(100, &HashSet::new());
        let now = Instant::now();
        let a = s.next_run(fast, now).unwrap();
        let b = s.next_run(slow, now).unwrap();
        assert_eq!(
            (a.first, a.count),
            (0, 8),
            "unmeasured peers get half a run"
        );
        assert_eq!(
            b.first, 8,
            "no piece is handed out twice while others are free"
        );
        run_all(&mut s, fast, a, 10);
        run_all(&mut s, slow, b, 160);
        let a = s.next_run(fast, now).unwrap();
        let b = s.next_run(slow, now).unwrap();
        assert_eq!(a.count, 16, "the fastest gets whole runs");
        assert_eq!(b.count, 1, "16 times slower: one piece at a time");
        assert_eq!(s.left(), 84);
    }

    #[test]
    fn a_liar_is_backed_off_and_its_pieces_go_to_another() {
        let (liar, honest) = (random_peer(), random_peer());
        let mut s = Schedule::new(4, &HashSet::new());
        let now = Instant::now();
        let run = s.next_run(liar, now).unwrap();
        assert_eq!((run.first, run.count), (0, 4));
        s.ended(liar, run, Outcome::Lied, now);
        assert!(s.backed_off(&liar, now + Duration::from_secs(29)));
        assert!(s.next_run(liar, now).is_none());
        let again = s.next_run(honest, now).unwrap();
        assert_eq!(
            (again.first, again.count),
            (0, 4),
            "the liar's pieces, to the honest"
        );
        run_all(&mut s, honest, again, 10);
        assert!(s.is_complete());
        assert_eq!(s.strikes(&liar), 1);
        assert_eq!(s.delivered()[&honest], 4);
        // A second strike doubles the wait.
        let mut s = Schedule::new(4, &HashSet::new());
        let later = now + Duration::from_secs(1000);
        let run = s.next_run(liar, now).unwrap();
        s.ended(liar, run, Outcome::Lied, now);
        let run = s.next_run(liar, later).unwrap();
        s.ended(liar, run, Outcome::Lied, later);
        assert!(s.backed_off(&liar, later + Duration::from_secs(59)));
        assert!(!s.backed_off(&liar, later + Duration::from_secs(61)));
    }

    #[test]
    fn a_resumed_pull_skips_what_it_has_and_the_end_game_duplicates_the_tail() {
        let have: HashSet<u64> = (0..6).collect();
        let mut s = Schedule::new(8, &have);
        let (a, b) = (random_peer(), random_peer());
        let now = Instant::now();
        let run = s.next_run(a, now).unwrap();
        assert_eq!((run.first, run.count), (6, 2));
        let dup = s.next_run(b, now).unwrap();
        assert_eq!(
            (dup.first, dup.count),
            (6, 2),
            "the end game: b races a for the tail"
        );
        assert!(
            s.next_run(random_peer(), now).is_none(),
            "two copies at most"
        );
        assert!(s.arrived(b, 6) && s.arrived(b, 7));
        assert!(!s.arrived(a, 6), "the second copy is not written");
        let quick = Outcome::Done {
            bytes: 1,
            took: Duration::from_millis(1),
        };
        s.ended(b, dup, quick, now);
        s.ended(a, run, Outcome::Failed, now);
        assert!(s.is_complete());
        assert!(s.backed_off(&a, now + Duration::from_secs(1)));
    }
}
