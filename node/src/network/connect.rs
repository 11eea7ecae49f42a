//! The connect state machine: being connected to a peer by its id.
//!
//! A connect dials the addresses the swarm knows for the peer. When there are none, or every
//! dial fails (stale addresses: the peer's relay went away, the peer moved), it asks the DHT
//! once where the peer is now and dials what that finds. It fails only when no dial and no
//! lookup for the peer remains: several dials may be in flight at once (ours, mDNS's, a
//! provider query's), and any of them connecting is enough. [`Connects::decide`] is the one
//! place that chooses between waiting, looking up and failing.
//!
//! Plain bookkeeping with no swarm, like [`super::relays`]: the swarm task performs the
//! [`Step`]s it returns and reports what happened. It is generic over the DHT query id so it
//! is tested without Kademlia.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::NetworkError;

/// Where a connect's result goes.
pub type Reply<T> = oneshot::Sender<Result<T, NetworkError>>;

/// What the swarm task must do next for a connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Dial the peer at the addresses the swarm knows, unless connected or being dialled;
    /// report the outcome with [`Connects::dial_started`].
    Dial(PeerId),
    /// Ask the DHT for the peer; report the query with [`Connects::lookup_started`].
    LookUp(PeerId),
    /// Dial the peer at these addresses (from the DHT), even while another dial is in flight;
    /// report the outcome with [`Connects::dial_started`].
    DialAt(PeerId, Vec<Multiaddr>),
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
    addr_dials: HashMap<ConnectionId, (Multiaddr, Reply<PeerId>)>,
    /// Connect replies waiting for a connection to their peer.
    waiting: HashMap<PeerId, Vec<Reply<()>>>,
    /// Peers being connected to whose DHT lookup already ran: the next failure is final.
    looked_up: HashSet<PeerId>,
    /// Every dial in flight (ours and other behaviours'), to know when a connect has run out
    /// of attempts.
    dialing: HashMap<ConnectionId, PeerId>,
    lookups: HashMap<Q, PeerId>,
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
        }
    }

    /// A dial of `addr` (peer unknown) that will make connection `id`; `reply` gets the peer.
    pub fn dial_addr(&mut self, id: ConnectionId, addr: Multiaddr, reply: Reply<PeerId>) {
        self.addr_dials.insert(id, (addr, reply));
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
        self.waiting.entry(peer).or_default().push(reply);
        Some(Step::Dial(peer))
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
        if let Some((_, reply)) = addr_dial {
            let _ = reply.send(Ok(peer));
        }
        for reply in self.waiting.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Ok(()));
        }
        self.looked_up.remove(&peer);
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
        if let Some((addr, reply)) = self.addr_dials.remove(&id) {
            let _ = reply.send(Err(NetworkError::DialAddr {
                addr,
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
        let lookup_may_help = matches!(failure, Failure::NoAddresses | Failure::Unreachable(_));
        if lookup_may_help && self.looked_up.insert(peer) {
            return Some(Step::LookUp(peer));
        }
        self.looked_up.remove(&peer);
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
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn conn(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    type Answer<T> = oneshot::Receiver<Result<T, NetworkError>>;

    fn connect(c: &mut Connects<u32>, target: PeerId) -> (Option<Step>, Answer<()>) {
        let (tx, rx) = oneshot::channel();
        (c.connect(target, false, tx), rx)
    }

    /// What the connect got, if anything yet.
    fn answer<T: std::fmt::Debug>(rx: &mut Answer<T>) -> Option<Result<T, NetworkError>> {
        rx.try_recv().ok()
    }

    #[test]
    fn a_dial_that_connects_answers_ok() {
        let (me, target) = (peer(), peer());
        let mut c = Connects::<u32>::new(me);
        let (step, mut rx) = connect(&mut c, target);
        assert_eq!(step, Some(Step::Dial(target)));
        assert_eq!(c.dial_started(target, DialStart::Started), None);
        c.on_dialing(conn(1), target);
        assert!(answer(&mut rx).is_none(), "waits for the dial");
        assert!(!c.on_established(conn(1), target));
        assert!(matches!(answer(&mut rx), Some(Ok(()))));
    }

    #[test]
    fn already_connected_answers_at_once() {
        let mut c = Connects::<u32>::new(peer());
        let (tx, mut rx) = oneshot::channel();
        assert_eq!(c.connect(peer(), true, tx), None);
        assert!(matches!(answer(&mut rx), Some(Ok(()))));
    }

    #[test]
    fn dialling_oneself_is_refused() {
        let me = peer();
        let mut c = Connects::<u32>::new(me);
        let (step, mut rx) = connect(&mut c, me);
        assert_eq!(step, None);
        assert!(matches!(answer(&mut rx), Some(Err(NetworkError::SelfDial))));
    }

    #[test]
    fn failed_dials_lead_to_a_lookup_then_a_dial_that_connects() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut rx) = connect(&mut c, target);
        c.dial_started(target, DialStart::Started);
        c.on_dialing(conn(1), target);
        let step = c.on_dial_failed(conn(1), Some(target), false, "connection refused");
        assert_eq!(step, Some(Step::LookUp(target)));
        c.lookup_started(7, target);
        assert_eq!(c.lookup_target(&7), Some(target));
        let found = vec![addr("/ip4/198.51.100.2/tcp/4001")];
        let step = c.on_lookup_done(&7, Some(found.clone()), false);
        assert_eq!(step, Some(Step::DialAt(target, found)));
        assert_eq!(c.lookup_target(&7), None);
        assert_eq!(c.dial_started(target, DialStart::Started), None);
        c.on_dialing(conn(2), target);
        assert!(answer(&mut rx).is_none());
        c.on_established(conn(2), target);
        assert!(matches!(answer(&mut rx), Some(Ok(()))));
    }

    #[test]
    fn no_known_address_looks_up_and_not_found_fails() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut rx) = connect(&mut c, target);
        let step = c.dial_started(target, DialStart::NoAddresses);
        assert_eq!(step, Some(Step::LookUp(target)));
        c.lookup_started(1, target);
        assert_eq!(c.on_lookup_done(&1, None, false), None);
        match answer(&mut rx) {
            Some(Err(e @ NetworkError::NotFound { .. })) => {
                assert!(e.to_string().contains("not found"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn found_without_addresses_is_not_found() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut rx) = connect(&mut c, target);
        c.dial_started(target, DialStart::NoAddresses);
        c.lookup_started(1, target);
        assert_eq!(c.on_lookup_done(&1, Some(vec![]), false), None);
        assert!(matches!(
            answer(&mut rx),
            Some(Err(NetworkError::NotFound { .. }))
        ));
    }

    #[test]
    fn a_second_failure_after_the_lookup_is_final() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut rx) = connect(&mut c, target);
        c.on_dialing(conn(1), target);
        assert_eq!(
            c.on_dial_failed(conn(1), Some(target), false, "refused"),
            Some(Step::LookUp(target))
        );
        c.lookup_started(1, target);
        let found = vec![addr("/ip4/198.51.100.2/tcp/4001")];
        assert!(c.on_lookup_done(&1, Some(found), false).is_some());
        c.on_dialing(conn(2), target);
        assert_eq!(
            c.on_dial_failed(conn(2), Some(target), false, "timed out"),
            None
        );
        match answer(&mut rx) {
            Some(Err(NetworkError::Unreachable { peer, reason })) => {
                assert_eq!((peer, reason.as_str()), (target, "timed out"))
            }
            other => panic!("{other:?}"),
        }
        // A later connect starts over: its failure may look the peer up again.
        let (_, _rx) = connect(&mut c, target);
        c.on_dialing(conn(3), target);
        assert_eq!(
            c.on_dial_failed(conn(3), Some(target), false, "refused"),
            Some(Step::LookUp(target))
        );
    }

    #[test]
    fn fails_only_when_no_dial_remains() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut first) = connect(&mut c, target);
        let (_, mut second) = connect(&mut c, target);
        // Ours, and one another behaviour (mDNS, a provider query) started.
        c.on_dialing(conn(1), target);
        c.on_dialing(conn(2), target);
        assert_eq!(c.on_dial_failed(conn(1), Some(target), false, "a"), None);
        assert!(answer(&mut first).is_none(), "conn 2 may still connect");
        assert_eq!(
            c.on_dial_failed(conn(2), Some(target), false, "b"),
            Some(Step::LookUp(target))
        );
        c.lookup_started(1, target);
        c.on_dialing(conn(3), target);
        // The lookup finds nothing while a dial is still in flight: wait for that dial.
        assert_eq!(c.on_lookup_done(&1, None, false), None);
        assert!(answer(&mut first).is_none());
        assert_eq!(c.on_dial_failed(conn(3), Some(target), false, "c"), None);
        assert!(matches!(
            answer(&mut first),
            Some(Err(NetworkError::Unreachable { .. }))
        ));
        assert!(matches!(
            answer(&mut second),
            Some(Err(NetworkError::Unreachable { .. }))
        ));
    }

    #[test]
    fn a_refused_dial_fails_without_a_lookup() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut rx) = connect(&mut c, target);
        assert_eq!(
            c.dial_started(target, DialStart::Refused("too many pending".into())),
            None
        );
        assert!(matches!(
            answer(&mut rx),
            Some(Err(NetworkError::DialFailed { .. }))
        ));
    }

    #[test]
    fn a_failure_while_connected_through_another_connection_is_ignored() {
        let target = peer();
        let mut c = Connects::<u32>::new(peer());
        let (_, mut rx) = connect(&mut c, target);
        c.on_dialing(conn(1), target);
        assert_eq!(c.on_dial_failed(conn(1), Some(target), true, "x"), None);
        assert!(answer(&mut rx).is_none(), "answered by on_established");
        c.on_established(conn(2), target);
        assert!(matches!(answer(&mut rx), Some(Ok(()))));
    }

    #[test]
    fn an_address_dial_reports_the_peer_or_the_error() {
        let mut c = Connects::<u32>::new(peer());
        let who = peer();
        let (tx, mut ok) = oneshot::channel();
        c.dial_addr(conn(1), addr("/ip4/198.51.100.3/tcp/1"), tx);
        assert!(c.on_established(conn(1), who), "a bootstrap address");
        assert!(matches!(answer(&mut ok), Some(Ok(p)) if p == who));
        let (tx, mut err) = oneshot::channel();
        c.dial_addr(conn(2), addr("/ip4/198.51.100.3/tcp/2"), tx);
        assert_eq!(c.on_dial_failed(conn(2), None, false, "refused"), None);
        match answer(&mut err) {
            Some(Err(NetworkError::DialAddr { addr: a, reason })) => {
                assert_eq!(a, addr("/ip4/198.51.100.3/tcp/2"));
                assert_eq!(reason, "refused");
            }
            other => panic!("{other:?}"),
        }
    }
}
