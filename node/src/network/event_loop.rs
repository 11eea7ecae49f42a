//! The task that owns the swarm: it runs commands from [`super::Client`] and reacts to
//! swarm events. Nothing here blocks or computes: inference runs elsewhere.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{autonat, dcutr, identify, kad, mdns, ping, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::behaviour::{MeshBehaviour, MeshBehaviourEvent, KAD};
use super::relays::{is_relayed, Relays};
use super::{
    ConnectedPeers, NetworkConfig, NetworkEvent, NetworkStatus, Path, PeerSummary, Reachability,
};
use mesh_protocol::ids::model_provider_key;

type Reply<T> = oneshot::Sender<Result<T, String>>;

pub enum Command {
    /// Dial an address (its peer id may be unknown) and report who answered.
    Dial {
        addr: Multiaddr,
        reply: Reply<PeerId>,
    },
    /// Be connected to `peer`, looking it up in the DHT if needed.
    Connect {
        peer: PeerId,
        reply: Reply<()>,
    },
    /// Announce (or stop announcing) that this node hosts `model`.
    Provide {
        model: String,
        on: bool,
    },
    /// Peers that announce `model`, not counting this node.
    FindProviders {
        model: String,
        reply: Reply<Vec<PeerId>>,
    },
    /// Walk the DHT to fill the routing table; replies when the walk ends.
    Bootstrap {
        reply: Reply<()>,
    },
    /// Every peer in the routing table.
    KnownPeers {
        reply: Reply<Vec<PeerId>>,
    },
    Peers {
        reply: Reply<Vec<PeerSummary>>,
    },
    ListenAddrs {
        reply: Reply<Vec<Multiaddr>>,
    },
    /// The path of the best open connection to `peer`.
    PathTo {
        peer: PeerId,
        reply: Reply<Option<Path>>,
    },
    Status {
        reply: Reply<NetworkStatus>,
    },
}

struct ConnectionInfo {
    peer: PeerId,
    path: Path,
    remote: Multiaddr,
}

#[derive(Default)]
struct PeerInfo {
    agent: Option<String>,
    rtt: Option<Duration>,
}

pub struct EventLoop {
    swarm: Swarm<MeshBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<NetworkEvent>,
    config: NetworkConfig,
    shutdown: CancellationToken,
    connections: HashMap<ConnectionId, ConnectionInfo>,
    connected: ConnectedPeers,
    peers: HashMap<PeerId, PeerInfo>,
    provided: HashSet<String>,
    last_announce: Option<Instant>,
    pending_dials: HashMap<ConnectionId, Reply<PeerId>>,
    pending_connects: HashMap<PeerId, Vec<Reply<()>>>,
    /// Peers being connected to whose DHT lookup already ran: a second failure is final.
    looked_up: HashSet<PeerId>,
    /// Every dial in flight (ours and other behaviours'), to know when a connect has run out
    /// of attempts.
    dialing: HashMap<ConnectionId, PeerId>,
    peer_lookups: HashMap<kad::QueryId, PeerId>,
    provider_queries: HashMap<kad::QueryId, (HashSet<PeerId>, Reply<Vec<PeerId>>)>,
    bootstrap_queries: HashMap<kad::QueryId, Reply<()>>,
    relays: Relays,
    /// What AutoNAT concluded last.
    nat_status: Reachability,
    /// When to tell connected peers our new addresses and protocols (see `push_identify_soon`).
    identify_push: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl EventLoop {
    pub fn new(
        swarm: Swarm<MeshBehaviour>,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<NetworkEvent>,
        config: NetworkConfig,
        shutdown: CancellationToken,
        connected: ConnectedPeers,
    ) -> Self {
        EventLoop {
            swarm,
            commands,
            events,
            shutdown,
            connections: HashMap::new(),
            connected,
            peers: HashMap::new(),
            provided: HashSet::new(),
            last_announce: None,
            pending_dials: HashMap::new(),
            pending_connects: HashMap::new(),
            looked_up: HashSet::new(),
            dialing: HashMap::new(),
            peer_lookups: HashMap::new(),
            provider_queries: HashMap::new(),
            bootstrap_queries: HashMap::new(),
            relays: Relays::new(if config.dht_server {
                config.max_relays
            } else {
                0
            }),
            nat_status: Reachability::Unknown,
            identify_push: None,
            config,
        }
    }

    pub async fn run(mut self) {
        for addr in self.config.external.clone() {
            tracing::info!(%addr, "external address (given)");
            self.swarm.add_external_address(addr);
        }
        // Retries relay reservations that failed or were waiting out a backoff.
        let mut relay_check = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = relay_check.tick() => self.reserve_relays(),
                _ = async { self.identify_push.as_mut().expect("guarded").await },
                    if self.identify_push.is_some() =>
                {
                    self.identify_push = None;
                    let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                    tracing::debug!(peers = peers.len(), "pushing our addresses and protocols");
                    self.swarm.behaviour_mut().identify.push(peers);
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = self.shutdown.cancelled() => break,
            }
        }
        for model in std::mem::take(&mut self.provided) {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&kad::RecordKey::new(&model_provider_key(&model)));
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        tracing::debug!("network task stopped");
    }

    fn emit(&self, event: NetworkEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Dial { addr, reply } => {
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("cannot dial {addr}: {e}")));
                    }
                }
            }
            Command::Connect { peer, reply } => self.connect(peer, reply),
            Command::Provide { model, on } => {
                let key = kad::RecordKey::new(&model_provider_key(&model));
                if on {
                    self.provided.insert(model);
                    self.announce_all();
                } else {
                    self.provided.remove(&model);
                    self.swarm.behaviour_mut().kad.stop_providing(&key);
                }
            }
            Command::FindProviders { model, reply } => {
                let key = kad::RecordKey::new(&model_provider_key(&model));
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.provider_queries.insert(id, (HashSet::new(), reply));
            }
            Command::Bootstrap { reply } => match self.swarm.behaviour_mut().kad.bootstrap() {
                Ok(id) => {
                    self.bootstrap_queries.insert(id, reply);
                }
                Err(_) => {
                    let _ = reply.send(Err("no known peers to start from".into()));
                }
            },
            Command::KnownPeers { reply } => {
                let mut peers = Vec::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        peers.push(*entry.node.key.preimage());
                    }
                }
                let _ = reply.send(Ok(peers));
            }
            Command::Peers { reply } => {
                let _ = reply.send(Ok(self.peer_summaries()));
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(Ok(self.swarm.listeners().cloned().collect()));
            }
            Command::PathTo { peer, reply } => {
                let _ = reply.send(Ok(self.best_path(&peer)));
            }
            Command::Status { reply } => {
                let _ = reply.send(Ok(self.status()));
            }
        }
    }

    fn directly_reachable(&self) -> bool {
        self.swarm.external_addresses().any(|a| !is_relayed(a))
    }

    fn status(&self) -> NetworkStatus {
        let reachability = if self.directly_reachable() {
            Reachability::Public
        } else {
            self.nat_status
        };
        NetworkStatus {
            reachability,
            external_addrs: self
                .swarm
                .external_addresses()
                .map(|a| a.to_string())
                .collect(),
            relays: self.relays.active().iter().map(|p| p.to_string()).collect(),
            relaying: self.swarm.behaviour().relay.is_enabled() && self.directly_reachable(),
        }
    }

    /// Reserves relay slots while this node cannot be dialled directly.
    fn reserve_relays(&mut self) {
        if self.directly_reachable() {
            return;
        }
        for (relay, addr) in self.relays.to_reserve(Instant::now()) {
            match self.swarm.listen_on(addr.clone()) {
                Ok(listener) => {
                    tracing::info!(%relay, %addr, "not reachable directly: asking a relay for a slot");
                    self.relays.requested(relay, listener);
                }
                Err(e) => tracing::warn!(%relay, %addr, "cannot listen through the relay: {e}"),
            }
        }
    }

    /// Tells connected peers, shortly, this node's addresses and protocols again. A new
    /// external address also turns Kademlia to server mode; identify pushes such a change by
    /// itself only on connections whose first identify exchange has finished, so a node that
    /// got its relay reservation in its first milliseconds would stay unknown to the DHT. The
    /// short delay lets the protocol change reach every connection before the push.
    fn push_identify_soon(&mut self) {
        if self.identify_push.is_none() {
            self.identify_push = Some(Box::pin(tokio::time::sleep(Duration::from_millis(300))));
        }
    }

    /// Reachable directly now: the relays are no longer needed.
    fn release_relays(&mut self) {
        for listener in self.relays.drain() {
            self.swarm.remove_listener(listener);
        }
    }

    fn connect(&mut self, peer: PeerId, reply: Reply<()>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if peer == *self.swarm.local_peer_id() {
            let _ = reply.send(Err("that is this node's own peer id".into()));
            return;
        }
        self.pending_connects.entry(peer).or_default().push(reply);
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            // If every address held fails (stale: the peer's relay went away), the DHT is
            // asked once before the connect fails (see OutgoingConnectionError).
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(DialError::NoAddresses) => {
                tracing::debug!(%peer, "no known address; looking the peer up in the DHT");
                self.look_up(peer);
            }
            Err(e) => self.fail_connects(&peer, format!("cannot dial {peer}: {e}")),
        }
    }

    /// Whether a dial or a DHT lookup for `peer` may still connect it.
    fn still_trying(&self, peer: &PeerId) -> bool {
        self.dialing.values().any(|p| p == peer) || self.peer_lookups.values().any(|p| p == peer)
    }

    fn look_up(&mut self, peer: PeerId) {
        self.looked_up.insert(peer);
        let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.peer_lookups.insert(id, peer);
    }

    fn fail_connects(&mut self, peer: &PeerId, reason: String) {
        self.looked_up.remove(peer);
        for reply in self.pending_connects.remove(peer).unwrap_or_default() {
            let _ = reply.send(Err(reason.clone()));
        }
    }

    fn announce_all(&mut self) {
        self.last_announce = Some(Instant::now());
        let models: Vec<String> = self.provided.iter().cloned().collect();
        for model in models {
            let key = kad::RecordKey::new(&model_provider_key(&model));
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                tracing::warn!(%model, "cannot announce: {e}");
            }
        }
    }

    fn best_path(&self, peer: &PeerId) -> Option<Path> {
        self.connections
            .values()
            .filter(|c| &c.peer == peer)
            .map(|c| c.path)
            .min_by_key(|p| match p {
                Path::Direct => 0,
                Path::HolePunched => 1,
                Path::Relayed => 2,
                Path::Local => 3,
            })
    }

    fn peer_summaries(&self) -> Vec<PeerSummary> {
        let mut by_peer: HashMap<PeerId, Vec<&ConnectionInfo>> = HashMap::new();
        for c in self.connections.values() {
            by_peer.entry(c.peer).or_default().push(c);
        }
        let mut out: Vec<PeerSummary> = by_peer
            .into_iter()
            .map(|(peer, conns)| {
                let info = self.peers.get(&peer);
                PeerSummary {
                    peer_id: peer.to_string(),
                    path: self.best_path(&peer).unwrap_or(Path::Direct),
                    addresses: conns.iter().map(|c| c.remote.to_string()).collect(),
                    connections: conns.len(),
                    agent: info.and_then(|i| i.agent.clone()),
                    rtt_ms: info.and_then(|i| i.rtt).map(|d| d.as_secs_f64() * 1000.0),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                if is_relayed(&address) {
                    // The relay client confirms it as external once the reservation holds.
                    tracing::debug!(%address, "listening through a relay");
                    return;
                }
                tracing::info!(%address, "listening");
                if self.config.announce_listen_addrs && self.chosen_ip(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(NetworkEvent::Listening(address));
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.relays.closed(listener_id, Instant::now()) {
                    tracing::info!(%relay, "relay reservation ended: {reason:?}");
                    self.reserve_relays();
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "reachable at");
                if !is_relayed(&address) {
                    self.release_relays();
                }
                self.push_identify_soon();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "no longer reachable at");
                self.push_identify_soon();
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => {
                self.dialing.insert(connection_id, peer);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.dialing.remove(&connection_id);
                let path = if endpoint.is_relayed() {
                    Path::Relayed
                } else if self
                    .connections
                    .values()
                    .any(|c| c.peer == peer_id && c.path == Path::Relayed)
                {
                    // A direct connection next to a relayed one is DCUtR's; on the side whose
                    // dial lost the race, no dcutr event says so.
                    Path::HolePunched
                } else {
                    Path::Direct
                };
                let remote = endpoint.get_remote_address().clone();
                tracing::info!(peer = %peer_id, %remote, path = path.as_str(), "connected");
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    if !endpoint.is_relayed() && self.pending_dials.contains_key(&connection_id) {
                        // A bootstrap address: put it in the routing table right away.
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, address.clone());
                    }
                }
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                for reply in self.pending_connects.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
                self.looked_up.remove(&peer_id);
                self.connections.insert(
                    connection_id,
                    ConnectionInfo {
                        peer: peer_id,
                        path,
                        remote,
                    },
                );
                self.peers.entry(peer_id).or_default();
                self.connected
                    .write()
                    .expect("never poisoned: no panics while held")
                    .insert(peer_id);
                self.emit(NetworkEvent::Connected {
                    peer: peer_id,
                    path,
                });
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                    self.relays.withdraw(&peer_id);
                    self.connected
                        .write()
                        .expect("never poisoned: no panics while held")
                        .remove(&peer_id);
                    self.emit(NetworkEvent::Disconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                self.dialing.remove(&connection_id);
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
                if let Some(peer) = peer_id {
                    let waiting = self.pending_connects.contains_key(&peer)
                        && !self.swarm.is_connected(&peer);
                    if !waiting || self.still_trying(&peer) {
                        // Another dial or the DHT lookup may still connect it.
                    } else if !self.looked_up.contains(&peer) {
                        // The addresses we held are stale (a relay went away, the peer moved):
                        // ask the DHT where the peer is now before giving up.
                        tracing::debug!(%peer, "known addresses failed; looking the peer up in the DHT");
                        self.look_up(peer);
                    } else {
                        self.fail_connects(&peer, format!("cannot reach {peer}: {error}"));
                    }
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: MeshBehaviourEvent) {
        match event {
            MeshBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                tracing::debug!(
                    peer = %peer_id,
                    dht_server = info.protocols.contains(&KAD),
                    addrs = ?info.listen_addrs,
                    "identified"
                );
                let direct = self
                    .connections
                    .get(&connection_id)
                    .is_some_and(|c| c.path != Path::Relayed);
                if direct && info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    self.relays.offer(peer_id, &info.listen_addrs);
                    self.reserve_relays();
                } else if direct {
                    self.relays.withdraw(&peer_id);
                }
                if info.protocols.contains(&KAD) {
                    for addr in info.listen_addrs.iter().filter(|a| !is_unspecified(a)) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                self.peers.entry(peer_id).or_default().agent = Some(info.agent_version);
            }
            MeshBehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.peers.entry(peer).or_default().rtt = Some(rtt);
            }
            MeshBehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "found on the LAN");
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![addr])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    let _ = self.swarm.dial(opts);
                }
            }
            MeshBehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(connection_id) => {
                    tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                    if let Some(c) = self.connections.get_mut(&connection_id) {
                        c.path = Path::HolePunched;
                    }
                    self.swarm
                        .behaviour_mut()
                        .streams
                        .hole_punched(remote_peer_id, connection_id);
                    self.emit(NetworkEvent::Connected {
                        peer: remote_peer_id,
                        path: Path::HolePunched,
                    });
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, "hole punch failed, staying relayed: {e}");
                    self.swarm
                        .behaviour_mut()
                        .streams
                        .hole_punch_failed(remote_peer_id);
                }
            },
            MeshBehaviourEvent::RelayClient(event) => match event {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    limit,
                } => {
                    let (duration, bytes) = limit
                        .as_ref()
                        .map_or((None, None), |l| (l.duration(), l.data_in_bytes()));
                    if !super::relays::fits_calls(duration, bytes) {
                        tracing::warn!(relay = %relay_peer_id, ?limit, "the relay's circuits are too short or too small for calls; not using it");
                        if let Some(listener) = self.relays.reject(&relay_peer_id) {
                            self.swarm.remove_listener(listener);
                        }
                        self.reserve_relays();
                    } else if self.relays.accepted(&relay_peer_id) {
                        tracing::info!(relay = %relay_peer_id, ?limit, "relay reservation accepted: reachable through the relay");
                        self.emit(NetworkEvent::Reserved {
                            relay: relay_peer_id,
                        });
                    } else {
                        tracing::debug!(relay = %relay_peer_id, renewal, "relay reservation renewed");
                    }
                }
                relay::client::Event::OutboundCircuitEstablished {
                    relay_peer_id,
                    limit,
                } => tracing::debug!(relay = %relay_peer_id, ?limit, "circuit to a peer opened"),
                relay::client::Event::InboundCircuitEstablished { src_peer_id, limit } => {
                    tracing::debug!(peer = %src_peer_id, ?limit, "circuit from a peer opened")
                }
            },
            MeshBehaviourEvent::Relay(event) => match event {
                relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                    tracing::info!(peer = %src_peer_id, "relaying for a peer");
                    // The peer is reachable through this relay from now on: put it in the
                    // routing table at its circuit addresses, so DHT lookups find it at once,
                    // without waiting for its identify push to announce them.
                    let me = *self.swarm.local_peer_id();
                    let circuits: Vec<Multiaddr> = self
                        .swarm
                        .external_addresses()
                        .filter(|a| !is_relayed(a))
                        .map(|a| super::relays::circuit_addr(&strip_p2p(a), &me))
                        .collect();
                    for addr in circuits {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&src_peer_id, addr);
                    }
                }
                relay::Event::CircuitReqAccepted {
                    src_peer_id,
                    dst_peer_id,
                } => tracing::debug!(from = %src_peer_id, to = %dst_peer_id, "relaying a circuit"),
                relay::Event::CircuitClosed {
                    src_peer_id,
                    dst_peer_id,
                    error,
                } => {
                    tracing::debug!(from = %src_peer_id, to = %dst_peer_id, ?error, "relayed circuit closed")
                }
                other => tracing::debug!("relay: {other:?}"),
            },
            MeshBehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "AutoNAT");
                self.nat_status = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
            }
            MeshBehaviourEvent::Kad(event) => self.on_kad_event(event),
            _ => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated {
                is_new_peer: true, ..
            } => {
                // A new neighbour may be one of the closest to our keys: tell it soon.
                let stale = self
                    .last_announce
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(2));
                if !self.provided.is_empty() && stale {
                    self.announce_all();
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    let local = *self.swarm.local_peer_id();
                    for peer in providers.into_iter().filter(|p| *p != local) {
                        // The provider's addresses live only as long as this query: dial now.
                        let opts = DialOpts::peer_id(peer)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                        if let Some((found, _)) = self.provider_queries.get_mut(&id) {
                            found.insert(peer);
                        }
                    }
                    // The reply waits for the whole walk, so a model hosted by several nodes
                    // gets all of them (for failover); the query timeout (15 s) stays below
                    // the client's wait (20 s), so a slow walk still answers with what it found.
                    if step.last {
                        self.finish_provider_query(id);
                    }
                }
                kad::QueryResult::GetProviders(_) => self.finish_provider_query(id),
                kad::QueryResult::GetClosestPeers(result) => {
                    let Some(target) = self.peer_lookups.remove(&id) else {
                        return;
                    };
                    let peers = match result {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    if !self.pending_connects.contains_key(&target)
                        || self.swarm.is_connected(&target)
                    {
                        return;
                    }
                    let failure = match peers.into_iter().find(|p| p.peer_id == target) {
                        Some(found) if !found.addrs.is_empty() => {
                            // Even while another dial for it is in flight.
                            let opts = DialOpts::peer_id(target)
                                .addresses(found.addrs)
                                .condition(PeerCondition::Disconnected)
                                .build();
                            match self.swarm.dial(opts) {
                                Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => None,
                                Err(e) => Some(format!("cannot dial {target}: {e}")),
                            }
                        }
                        _ => Some(format!("peer {target} was not found on the mesh")),
                    };
                    if let Some(reason) = failure {
                        if !self.still_trying(&target) {
                            self.fail_connects(&target, reason);
                        }
                    }
                }
                kad::QueryResult::Bootstrap(result) => {
                    let done = match &result {
                        Ok(ok) => ok.num_remaining == 0,
                        Err(_) => true,
                    };
                    if done || step.last {
                        if let Some(reply) = self.bootstrap_queries.remove(&id) {
                            let _ = reply.send(result.map(|_| ()).map_err(|e| e.to_string()));
                        }
                    }
                }
                kad::QueryResult::StartProviding(Err(e)) => {
                    tracing::debug!("announcement reached no peer yet: {e:?}")
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn finish_provider_query(&mut self, id: kad::QueryId) {
        if let Some((found, reply)) = self.provider_queries.remove(&id) {
            let _ = reply.send(Ok(found.into_iter().collect()));
        }
    }
}

impl EventLoop {
    /// Whether `addr` comes from a listener the operator bound to a specific IP.
    fn chosen_ip(&self, addr: &Multiaddr) -> bool {
        let ip_of = |a: &Multiaddr| {
            a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                libp2p::multiaddr::Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            })
        };
        let Some(ip) = ip_of(addr) else { return false };
        self.config
            .listen
            .iter()
            .filter_map(ip_of)
            .any(|chosen| chosen == ip && !chosen.is_unspecified())
    }
}

fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_unspecified(),
        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
