//! The task that owns the swarm: it runs commands from [`super::Client`] and reacts to swarm
//! events. Nothing here blocks or computes: inference runs elsewhere.
//!
//! This is a shell. What to do is decided by plain structs, each tested without a network:
//! [`Connects`] (connecting to a peer by id), [`Discovery`] (DHT announcements and queries),
//! [`Reach`] (reachability, relays, identify pushes), [`trim`] (which connections to close past
//! the high mark) and the [`PeerTable`] (kept by the stream behaviour). The shell passes events
//! in and performs the actions they return.
//!
//! [`PeerTable`]: super::peer_table::PeerTable
//! [`trim`]: super::trim

mod behaviour_events;
mod command;

pub use command::{Command, Reply};

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{kad, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::addr::{chosen_ip, is_relayed};
use super::behaviour::{MeshBehaviour, MeshBehaviourEvent};
use super::connect::{Connects, DialStart, Step};
use super::discovery::{Discovery, Topic};
use super::peer_table::SharedPeerTable;
use super::reachability::{directly_reachable, Reach};
use super::{NetworkConfig, NetworkError, NetworkEvent, Path};

/// How often relay reservations that failed or were waiting out a backoff are retried.
const RELAY_CHECK: Duration = Duration::from_secs(5);

pub struct EventLoop {
    swarm: Swarm<MeshBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<NetworkEvent>,
    config: NetworkConfig,
    shutdown: CancellationToken,
    /// Written by the stream behaviour; the swarm task adds agents and round-trip times.
    table: SharedPeerTable,
    connects: Connects,
    discovery: Discovery,
    reach: Reach,
    recorders: Recorders,
    repunch: super::repunch::Repunch,
    /// Observed addresses and hole punches, for `mesh doctor`.
    diagnosis: super::diagnosis::Diagnosis,
    /// Peers using this node as their relay, whose connections are never trimmed.
    relay_users: super::trim::RelayUsers,
}

/// Where the swarm task counts what happens: libp2p's own metrics (connections, Kademlia
/// queries, identify, ping, relay, DCUtR) and mesh's (hole punches, relay reservations).
pub struct Recorders {
    pub p2p: libp2p::metrics::Metrics,
    pub mesh: crate::metrics::Metrics,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<MeshBehaviour>,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<NetworkEvent>,
        config: NetworkConfig,
        shutdown: CancellationToken,
        table: SharedPeerTable,
        recorders: Recorders,
    ) -> Self {
        let me = *swarm.local_peer_id();
        let max_relays = if config.dht_server {
            config.max_relays
        } else {
            0
        };
        EventLoop {
            swarm,
            commands,
            events,
            config,
            shutdown,
            table,
            connects: Connects::new(me),
            discovery: Discovery::new(me),
            reach: Reach::new(max_relays),
            recorders,
            repunch: Default::default(),
            diagnosis: Default::default(),
            relay_users: Default::default(),
        }
    }

    pub async fn run(mut self) {
        for addr in self.config.external.clone() {
            tracing::info!(%addr, "external address (given)");
            self.swarm.add_external_address(addr);
        }
        let mut relay_check = tokio::time::interval(RELAY_CHECK);
        let mut trim_check = tokio::time::interval(super::trim::CHECK_EVERY);
        trim_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let push_at = self.reach.push_due();
            let push_deadline = push_at.map_or_else(tokio::time::Instant::now, Into::into);
            let lookup_at = self.connects.next_due();
            let lookup_deadline = lookup_at.map_or_else(tokio::time::Instant::now, Into::into);
            let answer_at = self.discovery.next_due();
            let answer_deadline = answer_at.map_or_else(tokio::time::Instant::now, Into::into);
            let repunch_at = self.repunch.next_due();
            let repunch_deadline = repunch_at.map_or_else(tokio::time::Instant::now, Into::into);
            let settle_at = self.discovery.settle_due();
            let settle_deadline = settle_at.map_or_else(tokio::time::Instant::now, Into::into);
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = relay_check.tick() => self.reserve_relays(),
                _ = trim_check.tick() => self.trim_connections(),
                _ = tokio::time::sleep_until(push_deadline), if push_at.is_some() => {
                    self.reach.pushed();
                    let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                    tracing::debug!(peers = peers.len(), "pushing our addresses and protocols");
                    self.swarm.behaviour_mut().identify.push(peers);
                }
                _ = tokio::time::sleep_until(lookup_deadline), if lookup_at.is_some() => {
                    let swarm = &self.swarm;
                    let steps = self
                        .connects
                        .due_lookups(Instant::now(), |peer| swarm.is_connected(peer));
                    for step in steps {
                        tracing::debug!(?step, "a dial is slow to connect; looking the peer up alongside");
                        self.perform(Some(step));
                    }
                }
                _ = tokio::time::sleep_until(answer_deadline), if answer_at.is_some() => {
                    // Provider queries that found hosts a while ago answer with them; their
                    // walks end here.
                    for id in self.discovery.answer_due(Instant::now()) {
                        if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            query.finish();
                        }
                    }
                }
                _ = tokio::time::sleep_until(repunch_deadline), if repunch_at.is_some() => {
                    self.punch_again();
                }
                _ = tokio::time::sleep_until(settle_deadline), if settle_at.is_some() => {
                    let topics = self.discovery.on_settle_due(Instant::now());
                    self.announce(topics);
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = self.shutdown.cancelled() => break,
            }
        }
        for topic in self.discovery.stop_all() {
            self.swarm.behaviour_mut().kad.stop_providing(&topic.key());
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        tracing::debug!("network task stopped");
    }

    /// Past the high mark, closes the connections [`super::trim::to_close`] picks.
    fn trim_connections(&mut self) {
        let marks = self.config.connection_marks;
        if (self
            .swarm
            .network_info()
            .connection_counters()
            .num_established() as usize)
            <= marks.high
        {
            return;
        }
        let table_peers: std::collections::HashSet<PeerId> =
            self.routing_table_peers().into_iter().collect();
        let open: Vec<super::trim::Open> = {
            let table = self.table.read();
            table
                .every_connection()
                .into_iter()
                .map(|(peer, c, best)| super::trim::Open {
                    peer,
                    id: c.id,
                    since: c.since,
                    protected: c.streams > 0
                        || c.path != Path::Direct
                        || self.reach.reserves_with(&peer)
                        || self.relay_users.uses(&peer),
                    spare: !best,
                    in_routing_table: table_peers.contains(&peer),
                })
                .collect()
        };
        let closing = super::trim::to_close(&marks, &open, Instant::now());
        if closing.is_empty() {
            return;
        }
        tracing::debug!(
            open = open.len(),
            closing = closing.len(),
            "over the connection high mark; closing idle Kademlia connections"
        );
        self.recorders.mesh.connections_trimmed(closing.len());
        for (_, id) in closing {
            self.swarm.close_connection(id);
        }
    }

    /// Every peer in the Kademlia routing table.
    fn routing_table_peers(&mut self) -> Vec<PeerId> {
        let mut peers = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                peers.push(*entry.node.key.preimage());
            }
        }
        peers
    }

    fn emit(&self, event: NetworkEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Dial { addr, reply } => self.dial_addr(addr, reply, false),
            Command::Connect { peer, reply } => {
                let connected = self.swarm.is_connected(&peer);
                let step = self.connects.connect(peer, connected, reply);
                self.perform(step);
            }
            Command::Disconnect { peer } => {
                tracing::info!(%peer, "closing the connections to a peer that stopped answering on them");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Provide { topic } => {
                let topics = self.discovery.provide(topic, Instant::now());
                self.announce(topics);
            }
            Command::FindProviders { topic, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(topic.key());
                self.discovery.providers_started(id, reply);
            }
            Command::Bootstrap { reply } => match self.swarm.behaviour_mut().kad.bootstrap() {
                Ok(id) => self.discovery.bootstrap_started(id, reply),
                Err(kad::NoKnownPeers()) => {
                    let _ = reply.send(Err(NetworkError::NoKnownPeers));
                }
            },
            Command::KnownPeers { reply } => {
                let _ = reply.send(Ok(self.routing_table_peers()));
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(Ok(self.swarm.listeners().cloned().collect()));
            }
            Command::Status { reply } => {
                let external: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
                let relay_server = self.swarm.behaviour().relay.is_enabled();
                let mut status = self.reach.status(&external, relay_server);
                status.dht = self.swarm.behaviour_mut().kad.store_mut().stats();
                let _ = reply.send(Ok(status));
            }
            Command::Diagnose { reply } => {
                let _ = reply.send(Ok(self.diagnosis.report(Instant::now())));
            }
        }
    }

    /// Performs what the connect state machine decided, and what that leads to.
    /// Dials `addr` for a `Command::Dial`, from the listening port unless `from_new_port`.
    fn dial_addr(&mut self, addr: Multiaddr, reply: Reply<PeerId>, from_new_port: bool) {
        let opts = DialOpts::unknown_peer_id().address(addr.clone());
        let opts = if from_new_port {
            opts.allocate_new_port().build()
        } else {
            opts.build()
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => self.connects.dial_addr(id, addr, reply, from_new_port),
            Err(e) => {
                let reason = format!("cannot dial {addr}: {e}");
                let _ = reply.send(Err(NetworkError::DialAddr { addr, reason }));
            }
        }
    }

    fn perform(&mut self, mut next: Option<Step>) {
        while let Some(step) = next.take() {
            next = match step {
                Step::Dial(peer) => {
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::Disconnected)
                        .build();
                    let start = dial_start(self.swarm.dial(opts));
                    match start {
                        DialStart::NoAddresses => {
                            tracing::debug!(%peer, "no known address; looking the peer up in the DHT")
                        }
                        DialStart::Started => self.connects.lookup_later(peer, Instant::now()),
                        DialStart::Refused(_) => {}
                    }
                    self.connects.dial_started(peer, start)
                }
                Step::DialAt(peer, addrs) => {
                    // Even while another dial for it is in flight.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::Disconnected)
                        .build();
                    let start = dial_start(self.swarm.dial(opts));
                    self.connects.dial_started(peer, start)
                }
                Step::DialFromNewPort(peer) => {
                    tracing::debug!(%peer, "the listening port is taken towards the peer; dialling from a new port");
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::Disconnected)
                        .allocate_new_port()
                        .build();
                    let start = dial_start(self.swarm.dial(opts));
                    self.connects.dial_started(peer, start)
                }
                Step::LookUp(peer) => {
                    let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.connects.lookup_started(id, peer);
                    None
                }
            };
        }
    }

    fn announce(&mut self, topics: Vec<Topic>) {
        for topic in topics {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(topic.key()) {
                tracing::warn!(%topic, "cannot announce: {e}");
            }
        }
    }

    /// For each peer whose hole punch failed a while ago and that is still reached only
    /// through a relay: opens another relayed connection to it, which makes DCUtR try again
    /// (`super::repunch`). Only the node that dialled the relayed connection does (it knows
    /// the circuit's address), and only while the peer has room for one more connection.
    fn punch_again(&mut self) {
        for peer in self.repunch.due(Instant::now()) {
            let circuit = {
                let table = self.table.read();
                let connections = table.connections(&peer);
                let all_relayed = connections.iter().all(|c| c.path == Path::Relayed);
                let room = connections.len() < self.config.max_connections_per_peer.max(2) as usize;
                connections
                    .iter()
                    .map(|c| c.remote.clone())
                    .find(|remote| is_relayed(remote) && super::addr::ip_of(remote).is_some())
                    .filter(|_| all_relayed && room)
            };
            let Some(circuit) = circuit else {
                self.repunch.done(&peer);
                continue;
            };
            tracing::info!(%peer, %circuit, "hole punch failed earlier: another relayed connection, so DCUtR tries again");
            let opts = DialOpts::peer_id(peer)
                .addresses(vec![circuit])
                .condition(PeerCondition::Always)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "could not dial for another hole punch: {e}");
            }
        }
    }

    /// Reserves relay slots while this node cannot be dialled directly.
    fn reserve_relays(&mut self) {
        let direct = directly_reachable(self.swarm.external_addresses());
        let rtt_ms = self.table.read().round_trips_ms();
        for (relay, addr) in self.reach.to_reserve(direct, Instant::now(), &rtt_ms) {
            match self.swarm.listen_on(addr.clone()) {
                Ok(listener) => {
                    tracing::info!(%relay, %addr, "not reachable directly: asking a relay for a slot");
                    self.reach.reserving(relay, listener);
                }
                Err(e) => tracing::warn!(%relay, %addr, "cannot listen through the relay: {e}"),
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        {
            use libp2p::metrics::Recorder;
            self.recorders.p2p.record(&event);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                if is_relayed(&address) {
                    // The relay client confirms it as external once the reservation holds.
                    tracing::debug!(%address, "listening through a relay");
                    return;
                }
                tracing::info!(%address, "listening");
                if self.config.announce_listen_addrs && chosen_ip(&address, &self.config.listen) {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(NetworkEvent::Listening(address));
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.reach.on_listener_closed(listener_id, Instant::now()) {
                    tracing::info!(%relay, "relay reservation ended: {reason:?}");
                    self.reserve_relays();
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "reachable at");
                for listener in self.reach.on_external_confirmed(&address, Instant::now()) {
                    self.swarm.remove_listener(listener);
                }
                let topics = self.discovery.on_new_address(Instant::now());
                self.announce(topics);
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "no longer reachable at");
                self.reach.on_external_expired(Instant::now());
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => self.connects.on_dialing(connection_id, peer),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                // The stream behaviour recorded (and classified) it already.
                let path = self.table.read().path_of(&peer_id, connection_id);
                let path = path.unwrap_or(if endpoint.is_relayed() {
                    Path::Relayed
                } else {
                    Path::Direct
                });
                let remote = endpoint.get_remote_address();
                tracing::info!(peer = %peer_id, %remote, path = path.as_str(), "connected");
                let addr_dial = self.connects.on_established(connection_id, peer_id);
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    if addr_dial && !endpoint.is_relayed() {
                        // A bootstrap address: put it in the routing table right away.
                        let kad = &mut self.swarm.behaviour_mut().kad;
                        kad.add_address(&peer_id, address.clone());
                    }
                }
                self.emit(NetworkEvent::Connected {
                    peer: peer_id,
                    path,
                });
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.reach.on_disconnected(&peer_id);
                self.repunch.done(&peer_id);
                self.emit(NetworkEvent::Disconnected { peer: peer_id });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                let error = error.to_string();
                if let Some((addr, reply)) =
                    self.connects.retry_from_new_port(connection_id, &error)
                {
                    tracing::debug!(%addr, "the listening port is taken towards the address; dialling from a new port");
                    self.dial_addr(addr, reply, true);
                }
                let connected = peer_id.is_some_and(|p| self.swarm.is_connected(&p));
                let step = self
                    .connects
                    .on_dial_failed(connection_id, peer_id, connected, &error);
                if let Some(Step::LookUp(peer)) = &step {
                    // The addresses we held are stale (a relay went away, the peer moved).
                    tracing::debug!(%peer, "known addresses failed; looking the peer up in the DHT");
                }
                self.perform(step);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }
}

/// What `Swarm::dial` said, for the connect state machine.
fn dial_start(result: Result<(), DialError>) -> DialStart {
    match result {
        Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => DialStart::Started,
        Err(DialError::NoAddresses) => DialStart::NoAddresses,
        Err(e) => DialStart::Refused(e.to_string()),
    }
}
