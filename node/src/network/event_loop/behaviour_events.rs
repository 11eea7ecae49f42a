//! The swarm task's dispatch of behaviour events (identify, ping, mDNS, DCUtR, the relay
//! client and server, AutoNAT, Kademlia) into the parts that decide what to do.

use std::time::Instant;

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{autonat, dcutr, identify, kad, mdns, ping, relay, Multiaddr};

use super::EventLoop;
use crate::network::addr::is_unspecified;
use crate::network::behaviour::{MeshBehaviourEvent, KAD};
use crate::network::reachability::{circuits_through, Reserved};
use crate::network::{NetworkEvent, Path};

/// Most addresses of one peer taken from identify, and kept in its routing-table entry.
pub const MAX_ADDRS_PER_PEER: usize = 8;

/// How many addresses the routing table holds for `peer`.
fn kad_addresses(
    kad: &mut kad::Behaviour<crate::network::provider_store::ProviderStore>,
    peer: &libp2p::PeerId,
) -> usize {
    kad.kbucket(*peer)
        .and_then(|bucket| {
            bucket
                .iter()
                .find(|entry| entry.node.key.preimage() == peer)
                .map(|entry| entry.node.value.iter().count())
        })
        .unwrap_or(0)
}

impl EventLoop {
    pub(super) fn on_behaviour_event(&mut self, event: MeshBehaviourEvent) {
        self.record(&event);
        match event {
            MeshBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                // A peer may list (and push) any number of addresses: the first few count.
                let listen_addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| !is_unspecified(a))
                    .take(MAX_ADDRS_PER_PEER)
                    .cloned()
                    .collect();
                tracing::debug!(
                    peer = %peer_id,
                    dht_server = info.protocols.contains(&KAD),
                    addrs = ?listen_addrs,
                    listed = info.listen_addrs.len(),
                    "identified"
                );
                let path = self.table.read().path_of(&peer_id, connection_id);
                let relayed = path.is_none_or(|p| p == Path::Relayed);
                let observed = super::super::diagnosis::transport(&info.observed_addr);
                let listens = observed.is_some()
                    && self
                        .swarm
                        .listeners()
                        .any(|l| super::super::diagnosis::transport(l) == observed);
                if !relayed && listens {
                    let now = Instant::now();
                    self.diagnosis.observed(peer_id, &info.observed_addr, now);
                }
                let offers_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                if self
                    .reach
                    .on_identified(peer_id, relayed, offers_relay, &listen_addrs)
                {
                    self.reserve_relays();
                }
                if info.protocols.contains(&KAD) {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    // Pushes add addresses to the routing table's entry: past the bound, the
                    // entry starts again from the latest list.
                    if kad_addresses(kad, &peer_id) + listen_addrs.len() > MAX_ADDRS_PER_PEER {
                        kad.remove_peer(&peer_id);
                    }
                    for addr in listen_addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
                self.table.write().set_agent(&peer_id, info.agent_version);
            }
            MeshBehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => self.table.write().set_rtt(&peer, rtt),
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
                remote_peer_id: peer,
                result,
            }) => match result {
                Ok(connection_id) => {
                    tracing::info!(%peer, "hole punched: direct connection");
                    self.repunch.done(&peer);
                    self.diagnosis.punched(peer, Ok(()), Instant::now());
                    let streams = &mut self.swarm.behaviour_mut().streams;
                    streams.hole_punched(peer, connection_id);
                    self.emit(NetworkEvent::Connected {
                        peer,
                        path: Path::HolePunched,
                    });
                }
                Err(e) => {
                    tracing::info!(%peer, "hole punch failed, staying relayed: {e}");
                    self.repunch.failed(peer, Instant::now());
                    self.diagnosis
                        .punched(peer, Err(e.to_string()), Instant::now());
                    self.swarm.behaviour_mut().streams.hole_punch_failed(peer);
                }
            },
            MeshBehaviourEvent::RelayClient(event) => self.on_relay_client_event(event),
            MeshBehaviourEvent::Relay(event) => self.on_relay_server_event(event),
            MeshBehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "AutoNAT");
                self.reach.on_nat_status(&new);
            }
            MeshBehaviourEvent::Kad(event) => self.on_kad_event(event),
            _ => {}
        }
    }

    /// Counts `event` in libp2p's metrics and mesh's.
    fn record(&self, event: &MeshBehaviourEvent) {
        use libp2p::metrics::Recorder;
        let (p2p, mesh) = (&self.recorders.p2p, &self.recorders.mesh);
        match event {
            MeshBehaviourEvent::Identify(e) => p2p.record(e),
            MeshBehaviourEvent::Ping(e) => p2p.record(e),
            MeshBehaviourEvent::Kad(e) => p2p.record(e),
            MeshBehaviourEvent::Relay(e) => {
                p2p.record(e);
                match e {
                    relay::Event::ReservationReqAccepted { .. } => {
                        mesh.relay("relay", "reservation_accepted")
                    }
                    relay::Event::ReservationReqDenied { .. } => {
                        mesh.relay("relay", "reservation_denied")
                    }
                    relay::Event::CircuitReqAccepted { .. } => {
                        mesh.relay("relay", "circuit_opened")
                    }
                    relay::Event::CircuitReqDenied { .. } => mesh.relay("relay", "circuit_denied"),
                    _ => {}
                }
            }
            MeshBehaviourEvent::Dcutr(e) => {
                p2p.record(e);
                mesh.hole_punch(e.result.is_ok());
            }
            MeshBehaviourEvent::RelayClient(e) => match e {
                relay::client::Event::ReservationReqAccepted { renewal: false, .. } => {
                    mesh.relay("client", "reservation_accepted")
                }
                relay::client::Event::OutboundCircuitEstablished { .. } => {
                    mesh.relay("client", "circuit_opened")
                }
                relay::client::Event::InboundCircuitEstablished { .. } => {
                    mesh.relay("client", "circuit_accepted")
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn on_relay_client_event(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id: relay,
                renewal,
                limit,
            } => {
                let (duration, bytes) = limit
                    .as_ref()
                    .map_or((None, None), |l| (l.duration(), l.data_in_bytes()));
                match self.reach.on_reservation_accepted(&relay, duration, bytes) {
                    Reserved::Unfit(listener) => {
                        tracing::warn!(%relay, ?limit, "the relay's circuits are too short or too small for calls; not using it");
                        if let Some(listener) = listener {
                            self.swarm.remove_listener(listener);
                        }
                        self.reserve_relays();
                    }
                    Reserved::New => {
                        tracing::info!(%relay, ?limit, "relay reservation accepted: reachable through the relay");
                        self.emit(NetworkEvent::Reserved { relay });
                    }
                    Reserved::Renewed => {
                        tracing::debug!(%relay, renewal, "relay reservation renewed")
                    }
                }
            }
            relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                limit,
            } => {
                tracing::debug!(relay = %relay_peer_id, ?limit, "circuit to a peer opened");
                self.reach.circuit_worked(&relay_peer_id);
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, limit } => {
                tracing::debug!(peer = %src_peer_id, ?limit, "circuit from a peer opened")
            }
        }
    }

    fn on_relay_server_event(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                tracing::info!(peer = %src_peer_id, "relaying for a peer");
                self.relay_users.reservation(src_peer_id, true);
                // The peer is reachable through this relay from now on: put it in the routing
                // table at its circuit addresses, so DHT lookups find it at once, without
                // waiting for its identify push to announce them.
                let me = *self.swarm.local_peer_id();
                let circuits: Vec<Multiaddr> =
                    circuits_through(&me, self.swarm.external_addresses());
                for addr in circuits {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    kad.add_address(&src_peer_id, addr);
                }
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                tracing::debug!(peer = %src_peer_id, "a reservation on this relay ended");
                self.relay_users.reservation(src_peer_id, false);
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::debug!(from = %src_peer_id, to = %dst_peer_id, "relaying a circuit");
                self.relay_users.circuit_opened(src_peer_id, dst_peer_id);
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                tracing::debug!(from = %src_peer_id, to = %dst_peer_id, ?error, "relayed circuit closed");
                self.relay_users.circuit_closed(&src_peer_id, &dst_peer_id);
            }
            other => tracing::debug!("relay: {other:?}"),
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated {
                is_new_peer: true, ..
            } => {
                // While the table is small, a new neighbour is likely one of the nearest to
                // our keys: tell it soon.
                let table_peers = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .map(|bucket| bucket.num_entries())
                    .sum();
                let models = self.discovery.on_new_neighbour(table_peers, Instant::now());
                self.announce(models);
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    for peer in self.discovery.on_providers(&id, providers, Instant::now()) {
                        // The provider's addresses live only as long as this query: dial now.
                        let opts = DialOpts::peer_id(peer)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                    if step.last {
                        self.recorders.mesh.dht_lookup(stats.num_requests());
                        self.discovery.providers_done(&id);
                    }
                }
                kad::QueryResult::GetProviders(_) => {
                    if step.last {
                        self.recorders.mesh.dht_lookup(stats.num_requests());
                    }
                    self.discovery.providers_done(&id);
                }
                kad::QueryResult::GetClosestPeers(result) => {
                    let Some(target) = self.connects.lookup_target(&id) else {
                        return;
                    };
                    let peers = match result {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    let found = peers.into_iter().find(|p| p.peer_id == target);
                    let connected = self.swarm.is_connected(&target);
                    let step = self
                        .connects
                        .on_lookup_done(&id, found.map(|f| f.addrs), connected);
                    self.perform(step);
                }
                kad::QueryResult::Bootstrap(result) => {
                    let result = result.map(|ok| ok.num_remaining);
                    self.discovery.on_bootstrap_step(&id, result, step.last);
                }
                kad::QueryResult::StartProviding(Err(e)) => {
                    tracing::debug!("announcement reached no peer yet: {e:?}")
                }
                _ => {}
            },
            _ => {}
        }
    }
}
