//! The connect state machine: being connected to a peer by its id.
//!
//! A connect dials the addresses the swarm knows for the peer. When there are none, when
//! every dial fails, or when the dial has not connected within [`LOOKUP_ALONGSIDE_AFTER`]
//! (stale addresses: the peer's relay went away, the peer moved; such a dial may hang until
//! its transport gives up), it asks the DHT once where the peer is now and dials what that
//! finds. It fails only when no dial and no
//! lookup for the peer remains: several dials may be in flight at once (ours, mDNS's, a
//! provider query's), and any of them connecting is enough. [`Connects::decide`] is the one
//! place that chooses between waiting, looking up and failing.
//!
//! Plain bookkeeping with no swarm, like [`super::relays`]: the swarm task performs the
//! [`Step`]s it returns and reports what happened. It is generic over the DHT query id so it
//! is tested without Kademlia.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::NetworkError;

/// A dial that has not connected within this long gets a DHT lookup alongside: when the
/// addresses held are stale (the relay of a circuit address went away, the peer moved), the
/// dial may hang until its transport times out, and the lookup finds where the peer is now.
pub const LOOKUP_ALONGSIDE_AFTER: Duration = Duration::from_millis(500);

/// Where a connect's result goes.
pub type Reply<T> = oneshot::Sender<Result<T, NetworkError>>;

/// What the swarm task must do next for a connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Dial the peer at the addresses the swarm knows, unless connected, even while another
    /// behaviour's dial to it is in flight (a hole punch's dial to an address that
    /// black-holes may hang for its whole timeout); report the outcome with
    /// [`Connects::dial_started`].
    Dial(PeerId),
    /// Ask the DHT for the peer; report the query with [`Connects::lookup_started`].
    LookUp(PeerId),
    /// Dial the peer at these addresses (from the DHT), even while another dial is in flight;
    /// report the outcome with [`Connects::dial_started`].
    DialAt(PeerId, Vec<Multiaddr>),
    /// Dial the peer again from a new local port: every dial from the listening port failed
    /// because that port already had a connection to the same address (see
    /// [`local_port_taken`]). Report the outcome with [`Connects::dial_started`].
    DialFromNewPort(PeerId),
}

/// Whether a dial failed because its local address was taken. Outgoing TCP connections
/// leave from the listening port (so the NAT mapping a hole punch needs is the listening
/// port's); when a connection from that port to the same remote address closed less than a
/// minute ago, the kernel may still hold it (`TIME_WAIT`) and refuse the new one with
/// `EADDRINUSE`. libp2p-tcp falls back to a new port only on `EADDRNOTAVAIL`, and the error
/// reaches the swarm as text, so it is recognised by libp2p's and the OS's wording.
pub fn local_port_taken(error: &str) -> bool {
    error.contains("Address already in use") || error.contains("os error 98")
}

/// A `Command::Dial`: the address, who gets the peer, and whether it already left from a
/// new port.
#[derive(Debug)]
struct AddrDial {
    addr: Multiaddr,
    reply: Reply<PeerId>,
    from_new_port: bool,
}

/// How starting a dial went (`Swarm::dial`'s answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialStart {
    /// Started, or not needed: already connected or being dialled.
    Started,
    /// The swarm knows no address for the peer.
    NoAddresses,
    /// Refused at once (a connection limit, for example): looking up would not help.
    Refused(String),
}

/// Why an attempt to reach a peer ended without a connection.
enum Failure {
    NoAddresses,
    Refused(String),
    /// A dial failed; the text is libp2p's.
    Unreachable(String),
    /// The DHT did not find the peer (or found it without addresses).
    NotFound,
}

#[derive(Debug)]
pub struct Connects<Q = libp2p::kad::QueryId> {
    local: PeerId,
    /// `Command::Dial` replies, by the connection the dial will make.
    addr_dials: HashMap<ConnectionId, AddrDial>,
    /// Connect replies waiting for a connection to their peer.
    waiting: HashMap<PeerId, Vec<Reply<()>>>,
    /// Peers being connected to whose DHT lookup already ran: the next failure is final.
    looked_up: HashSet<PeerId>,
    /// Every dial in flight (ours and other behaviours'), to know when a connect has run out
    /// of attempts.
    dialing: HashMap<ConnectionId, PeerId>,
    lookups: HashMap<Q, PeerId>,
    /// Peers being dialled for a connect, and when to look them up alongside the dial.
    lookup_due: HashMap<PeerId, Instant>,
    /// Peers being connected to that were already dialled from a new port.
    new_port_tried: HashSet<PeerId>,
}

impl<Q: Hash + Eq> Connects<Q> {
    /// The state machine of the node whose own peer id is `local`.
    pub fn new(local: PeerId) -> Self {
        Connects {
            local,
            addr_dials: HashMap::new(),
            waiting: HashMap::new(),
            looked_up: HashSet::new(),
            dialing: HashMap::new(),
            lookups: HashMap::new(),
            lookup_due: HashMap::new(),
            new_port_tried: HashSet::new(),
        }
    }

    /// A dial for a connect to `peer` started at `now`: unless it connects within
    /// [`LOOKUP_ALONGSIDE_AFTER`], the peer is looked up alongside it.
    pub fn lookup_later(&mut self, peer: PeerId, now: Instant) {
        if self.waiting.contains_key(&peer) && !self.looked_up.contains(&peer) {
            self.lookup_due
                .entry(peer)
                .or_insert(now + LOOKUP_ALONGSIDE_AFTER);
        }
    }

    /// When the next lookup alongside a dial is due, if one is.
    pub fn next_due(&self) -> Option<Instant> {
        self.lookup_due.values().min().copied()
    }

    /// The lookups due at `now`, for connects still waiting (`connected` says whether a peer
    /// got connected meanwhile). Each peer is looked up once per connect.
    pub fn due_lookups(&mut self, now: Instant, connected: impl Fn(&PeerId) -> bool) -> Vec<Step> {
        let due: Vec<PeerId> = self
            .lookup_due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(peer, _)| *peer)
            .collect();
        let mut steps = Vec::new();
        for peer in due {
            self.lookup_due.remove(&peer);
            let running = self.lookups.values().any(|p| *p == peer);
            if self.waiting.contains_key(&peer)
                && !connected(&peer)
                && !running
                && self.looked_up.insert(peer)
            {
                steps.push(Step::LookUp(peer));
            }
        }
        steps
    }

    /// A dial of `addr` (peer unknown) that will make connection `id`; `reply` gets the peer.
    /// `from_new_port`: the dial leaves from a new local port (a retry, see
    /// [`Connects::retry_from_new_port`]).
    pub fn dial_addr(
        &mut self,
        id: ConnectionId,
        addr: Multiaddr,
        reply: Reply<PeerId>,
        from_new_port: bool,
    ) {
        let dial = AddrDial {
            addr,
            reply,
            from_new_port,
        };
        self.addr_dials.insert(id, dial);
    }

    /// Address dial `id` failed with `error`: when the error is [`local_port_taken`] and the
    /// dial left from the listening port, it is handed back to be dialled once more from a new
    /// port (with [`Connects::dial_addr`], `from_new_port` set). Call before
    /// [`Connects::on_dial_failed`].
    pub fn retry_from_new_port(
        &mut self,
        id: ConnectionId,
        error: &str,
    ) -> Option<(Multiaddr, Reply<PeerId>)> {
        let retry = self
            .addr_dials
            .get(&id)
            .is_some_and(|dial| !dial.from_new_port && local_port_taken(error));
        if !retry {
            return None;
        }
        let dial = self.addr_dials.remove(&id)?;
        Some((dial.addr, dial.reply))
    }

    /// Asks to be connected to `peer` (`connected`: already is).
    pub fn connect(&mut self, peer: PeerId, connected: bool, reply: Reply<()>) -> Option<Step> {
        if connected {
            let _ = reply.send(Ok(()));
            return None;
        }
        if peer == self.local {
            let _ = reply.send(Err(NetworkError::SelfDial));
            return None;
        }
        let waiters = self.waiting.entry(peer).or_default();
        waiters.push(reply);
        // One dial per connect: later callers wait on the attempt already under way.
        (waiters.len() == 1).then_some(Step::Dial(peer))
    }

    /// How a [`Step::Dial`] or [`Step::DialAt`] for `peer` started.
    pub fn dial_started(&mut self, peer: PeerId, start: DialStart) -> Option<Step> {
        match start {
            DialStart::Started => None,
            DialStart::NoAddresses => self.decide(peer, false, Failure::NoAddresses),
            DialStart::Refused(reason) => self.decide(peer, false, Failure::Refused(reason)),
        }
    }

    /// The DHT query `id` looks for `peer` (after a [`Step::LookUp`]).
    pub fn lookup_started(&mut self, id: Q, peer: PeerId) {
        self.lookups.insert(id, peer);
    }

    /// A dial to `peer` is in flight as connection `id` (whoever started it).
    pub fn on_dialing(&mut self, id: ConnectionId, peer: PeerId) {
        self.dialing.insert(id, peer);
    }

    /// Connection `id` to `peer` is up: every connect waiting for the peer succeeds. True when
    /// it answers a [`Connects::dial_addr`] (the caller puts such an address in the DHT).
    pub fn on_established(&mut self, id: ConnectionId, peer: PeerId) -> bool {
        self.dialing.remove(&id);
        let addr_dial = self.addr_dials.remove(&id);
        let was_addr_dial = addr_dial.is_some();
        if let Some(dial) = addr_dial {
            let _ = dial.reply.send(Ok(peer));
        }
        for reply in self.waiting.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Ok(()));
        }
        self.looked_up.remove(&peer);
        self.lookup_due.remove(&peer);
        self.new_port_tried.remove(&peer);
        was_addr_dial
    }

    /// Dial `id` (to `peer`, if known) failed with `error`; `connected`: the peer is
    /// connected anyway (another connection).
    pub fn on_dial_failed(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        connected: bool,
        error: &str,
    ) -> Option<Step> {
        self.dialing.remove(&id);
        if let Some(dial) = self.addr_dials.remove(&id) {
            let _ = dial.reply.send(Err(NetworkError::DialAddr {
                addr: dial.addr,
                reason: error.to_string(),
            }));
        }
        self.decide(peer?, connected, Failure::Unreachable(error.to_string()))
    }

    /// The DHT query `id` ended; `found`: the addresses it found for the peer it looked for,
    /// if it found that peer. `connected`: the peer got connected meanwhile.
    pub fn on_lookup_done(
        &mut self,
        id: &Q,
        found: Option<Vec<Multiaddr>>,
        connected: bool,
    ) -> Option<Step> {
        let peer = self.lookups.remove(id)?;
        match found {
            Some(addrs) if !addrs.is_empty() && !connected && self.waiting.contains_key(&peer) => {
                Some(Step::DialAt(peer, addrs))
            }
            _ => self.decide(peer, connected, Failure::NotFound),
        }
    }

    /// The peer DHT query `id` looks for, if it is one of the connect lookups.
    pub fn lookup_target(&self, id: &Q) -> Option<PeerId> {
        self.lookups.get(id).copied()
    }

    /// After an attempt for `peer` ended without a connection: wait for another attempt still
    /// in flight, look the peer up (once), or fail every connect waiting for it.
    fn decide(&mut self, peer: PeerId, connected: bool, failure: Failure) -> Option<Step> {
        if connected || !self.waiting.contains_key(&peer) || self.still_trying(&peer) {
            return None;
        }
        if let Failure::Unreachable(reason) = &failure {
            if local_port_taken(reason) && self.new_port_tried.insert(peer) {
                return Some(Step::DialFromNewPort(peer));
            }
        }
        let lookup_may_help = matches!(failure, Failure::NoAddresses | Failure::Unreachable(_));
        if lookup_may_help && self.looked_up.insert(peer) {
            return Some(Step::LookUp(peer));
        }
        self.looked_up.remove(&peer);
        self.lookup_due.remove(&peer);
        self.new_port_tried.remove(&peer);
        for reply in self.waiting.remove(&peer).unwrap_or_default() {
            let error = match &failure {
                Failure::NoAddresses | Failure::NotFound => NetworkError::NotFound { peer },
                Failure::Refused(reason) => NetworkError::DialFailed {
                    peer,
                    reason: reason.clone(),
                },
                Failure::Unreachable(reason) => NetworkError::Unreachable {
                    peer,
                    reason: reason.clone(),
                },
            };
            let _ = reply.send(Err(error));
        }
        None
    }

    /// Whether a dial or a DHT lookup for `peer` may still connect it.
    fn still_trying(&self, peer: &PeerId) -> bool {
        self.dialing.values().any(|p| p == peer) || self.lookups.values().any(|p| p == peer)
    }
}

#[cfg(test)]
mod tests;
