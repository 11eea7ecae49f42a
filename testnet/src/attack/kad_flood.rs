//! A hostile Kademlia peer: it speaks mesh's DHT protocol with libp2p's own Kademlia, claims
//! hundreds of external addresses, and announces itself to one node as the provider of many
//! keys, so that each ADD_PROVIDER it sends carries an oversized address list.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad::{self, store::MemoryStore, QueryResult, RecordKey};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};

/// What a flood did.
#[derive(Debug, Clone, Default)]
pub struct KadFloodReport {
    /// The flooder's peer id.
    pub peer: Option<PeerId>,
    /// Keys it announced, and announcements its Kademlia reports as delivered.
    pub keys: usize,
    pub delivered: usize,
}

/// Announces `keys` keys to `target` (at `addr`), `wave` at a time, as a provider reachable at
/// `addresses` made-up addresses, within `deadline`.
pub async fn kad_flood(
    target: PeerId,
    addr: Multiaddr,
    keys: usize,
    addresses: usize,
    wave: usize,
    deadline: Duration,
) -> Result<KadFloodReport, String> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut config = kad::Config::new(mesh_node::network::behaviour::KAD);
            config
                .set_max_packet_size(256 * 1024)
                .set_query_timeout(Duration::from_secs(10));
            let mut kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), config);
            kad.set_mode(Some(kad::Mode::Server));
            kad
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    // Kademlia puts the swarm's external addresses in every provider record it sends.
    for n in 0..addresses {
        let (b, c) = ((n / 250) as u8, (n % 250) as u8 + 1);
        swarm.add_external_address(format!("/ip4/10.66.{b}.{c}/tcp/4001").parse().unwrap());
    }
    swarm.behaviour_mut().add_address(&target, addr);
    let mut report = KadFloodReport {
        peer: Some(*swarm.local_peer_id()),
        ..Default::default()
    };
    let end = Instant::now() + deadline;
    let mut next = 0;
    while next < keys {
        let mut pending = HashSet::new();
        for n in next..(next + wave).min(keys) {
            let key = RecordKey::new(&format!("/flood/{n}"));
            let query = swarm
                .behaviour_mut()
                .start_providing(key)
                .map_err(|e| e.to_string())?;
            pending.insert(query);
        }
        next = (next + wave).min(keys);
        report.keys = next;
        while !pending.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            let event = tokio::time::timeout(left, swarm.select_next_some())
                .await
                .map_err(|_| format!("the flood took longer than {deadline:?}: {report:?}"))?;
            if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                id,
                result: QueryResult::StartProviding(result),
                step,
                ..
            }) = event
            {
                if step.last && pending.remove(&id) && result.is_ok() {
                    report.delivered += 1;
                }
            }
        }
    }
    Ok(report)
}
