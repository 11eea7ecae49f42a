//! Attackers for tests and benchmarks, built from mesh's own crates and libp2p: what a hostile
//! peer can do to a node, reproduced for real (docs/security.md, "Hostile peers").
//!
//! - [`hostile`]: a provider that announces a model and then stalls, denies it, or answers from
//!   other weights ([`Act`]).
//! - [`half_open`]: TCP sockets to a node's port that never begin a handshake.
//! - [`sybil`], [`hold_sybils`], [`sybils_in_waves`]: throwaway peer ids that dial a node and
//!   hold the connection.
//! - [`Netns`]: a network namespace joined to this one by a veth pair, so attackers come from
//!   another IP than the honest nodes (libp2p on loopback always dials from 127.0.0.1).
//! - [`stalled_streams`]: inference streams that announce a 1 MiB request and send nothing more.
//! - [`kad_flood`]: a Kademlia peer announcing many keys, each with hundreds of addresses.
//! - [`blob_liar`]: a peer that holds a model's file and serves every piece corrupted.

mod blob_liar;
mod kad_flood;
pub use blob_liar::{blob_liar, BlobLiar};
pub use kad_flood::{kad_flood, KadFloodReport};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId};
use mesh_node::wire::{read_frame, write_frame};
use mesh_node::NodeIdentity;
use mesh_protocol::frame::{encode_body, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::ids::{CATALOG_PROTOCOL, INFER_PROTOCOL};
use mesh_protocol::{
    CatalogRequest, CatalogResponse, ErrorCode, FinishReason, InferRequest, InferResponse,
    ModelCard, SignedModelCard, Usage, WireError,
};
use tokio_util::sync::CancellationToken;

/// What a hostile provider does with the calls it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Reads the request and never answers, holding the stream open.
    Stall,
    /// Answers at once, from weights other than the ones its name stands for.
    Lie,
    /// Says it does not host the model it announced.
    Deny,
    /// Answers, and reports the largest numbers it can: load, token counts and timings.
    Inflate,
    /// Claims to be idle, and answers every call after this long.
    Slow(Duration),
}

/// A provider built from mesh's network crate, not from its server: it announces `model` in
/// the DHT with a card it signs itself, claims to be idle, and does `act` with every call.
pub struct Hostile {
    pub peer: PeerId,
    /// The swarm's task runs while a client of it lives.
    _client: mesh_node::network::Client,
    /// Inference calls it received.
    pub calls: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Dials `bootstrap` (again, a few times, if the dial fails) and waits until it is in the
/// routing table, so what the caller announces next reaches it.
pub(crate) async fn join(client: &mesh_node::network::Client, bootstrap: Multiaddr) -> PeerId {
    // A dial on loopback can fail for a moment under the load of many tests (the node itself
    // dials again from a new port on EADDRINUSE): try again.
    let mut attempt = 0;
    let boot_peer = loop {
        match client.dial(bootstrap.clone()).await {
            Ok(peer) => break peer,
            Err(e) => {
                attempt += 1;
                assert!(attempt < 5, "the attacker cannot join: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.known_peers().await.unwrap().contains(&boot_peer) {
        assert!(
            Instant::now() < deadline,
            "the bootstrap node never entered the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    boot_peer
}

/// A card for a llama model named `model` with weights `sha256` (and `blob_root`), signed by
/// `identity`, as an attacker announces it.
pub(crate) fn llama_card(
    identity: &NodeIdentity,
    model: &str,
    sha256: &str,
    max_concurrency: u32,
    blob_root: Option<String>,
) -> SignedModelCard {
    let card = ModelCard {
        name: model.into(),
        task: mesh_protocol::Task::Generate,
        architecture: "llama".into(),
        parameters: 0,
        quantization: "Q4_1".into(),
        context_length: 2048,
        embedding_dims: None,
        sha256: sha256.into(),
        license: None,
        max_concurrency,
        layers: None,
        blob_root,
        files: Vec::new(),
    };
    let bytes = encode_body(&card).unwrap();
    SignedModelCard {
        signature: identity
            .sign(&SignedModelCard::signed_message(&bytes))
            .to_vec(),
        card: bytes,
    }
}

pub async fn hostile(act: Act, model: &str, sha256: &str, bootstrap: Multiaddr) -> Hostile {
    let identity = NodeIdentity::generate();
    let config = crate::inprocess::loopback_config(vec![bootstrap.clone()]).network;
    let shutdown = CancellationToken::new();
    let (client, mut inbound, event_loop) =
        mesh_node::network::new(&identity, &config, shutdown.clone()).expect("a swarm");
    let mut events = client.events();
    tokio::spawn(event_loop.run());
    // As a node does: announce once listening on every address, so the records carry them,
    // and once the bootstrap node is in the routing table, so they reach it.
    let mut listening = 0;
    while listening < config.listen.len() {
        if let Ok(mesh_node::network::NetworkEvent::Listening(_)) = events.recv().await {
            listening += 1;
        }
    }
    join(&client, bootstrap.clone()).await;
    client.provide(model).await.expect("announces");
    let signed = llama_card(&identity, model, sha256, 64, None);
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (_, protocol, mut stream) = tokio::select! {
                next = inbound.recv() => match next { Some(s) => s, None => return },
                () = stop.cancelled() => return,
            };
            if protocol.as_ref() == CATALOG_PROTOCOL {
                let signed = signed.clone();
                tokio::spawn(async move {
                    let _ = read_frame::<CatalogRequest, _>(&mut stream, 1024).await;
                    let answer = CatalogResponse {
                        cards: vec![signed],
                        load: if act == Act::Inflate { u32::MAX } else { 0 },
                    };
                    let _ = write_frame(&mut stream, &answer, DEFAULT_MAX_FRAME_LEN).await;
                    let _ = stream.close().await;
                });
                continue;
            }
            if protocol.as_ref() != INFER_PROTOCOL {
                continue;
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let request = read_frame::<InferRequest, _>(&mut stream, DEFAULT_MAX_FRAME_LEN).await;
            let frames = match (act, request) {
                (Act::Stall, _) => {
                    held.push(stream);
                    continue;
                }
                (Act::Lie | Act::Slow(_), Ok(Some(request))) => vec![
                    InferResponse::Started {
                        model: request.model,
                        queue_ms: 0,
                    },
                    InferResponse::Delta {
                        text: "a lie".into(),
                        tokens: Vec::new(),
                    },
                    InferResponse::Done {
                        finish_reason: FinishReason::Stop,
                        usage: Usage::default(),
                        receipt: None,
                        stages: Vec::new(),
                    },
                ],
                (Act::Inflate, Ok(Some(request))) => vec![
                    InferResponse::Started {
                        model: request.model,
                        queue_ms: u64::MAX,
                    },
                    InferResponse::Delta {
                        text: "inflated".into(),
                        tokens: vec![u32::MAX; 4],
                    },
                    InferResponse::Done {
                        finish_reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens: u32::MAX,
                            completion_tokens: u32::MAX,
                            cached_tokens: u32::MAX,
                            time_to_first_token_ms: u64::MAX,
                            total_ms: u64::MAX,
                        },
                        receipt: None,
                        stages: Vec::new(),
                    },
                ],
                (Act::Deny | Act::Lie | Act::Inflate | Act::Slow(_), _) => {
                    vec![InferResponse::Error(WireError::new(
                        ErrorCode::UnknownModel,
                        "not here",
                    ))]
                }
            };
            tokio::spawn(async move {
                if let Act::Slow(wait) = act {
                    tokio::time::sleep(wait).await;
                }
                for frame in frames {
                    let _ = write_frame(&mut stream, &frame, DEFAULT_MAX_FRAME_LEN).await;
                }
                let _ = stream.close().await;
            });
        }
    });
    Hostile {
        _client: client,
        peer: identity.peer_id(),
        calls,
        shutdown,
    }
}

/// Opens up to `count` TCP connections from `from` to `to` that never begin a handshake.
pub async fn half_open(from: IpAddr, to: SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut sockets = Vec::new();
    for _ in 0..count {
        let socket = match from {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let Ok(socket) = socket else { break };
        if socket.bind(SocketAddr::new(from, 0)).is_err() {
            break;
        }
        if let Ok(stream) = socket.connect(to).await {
            sockets.push(stream);
        }
    }
    sockets
}

/// A bare libp2p peer with a fresh peer id that dials `target` and holds the connection: one
/// of many throwaway identities. libp2p picks the source IP itself (on loopback always
/// 127.0.0.1), so sybils from another IP run in a network namespace ([`Netns::run`]).
pub async fn sybil(target: Multiaddr) -> Option<libp2p::Swarm<libp2p::swarm::dummy::Behaviour>> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .ok()?
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .ok()?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm.dial(target).ok()?;
    Some(swarm)
}

/// How many sybils hold a connection, and how many were refused or lost one.
#[derive(Debug, Clone, Default)]
pub struct SybilCounts {
    pub connected: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
}

impl SybilCounts {
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn settled(&self) -> usize {
        self.connected() + self.refused.load(Ordering::SeqCst)
    }
}

/// Drives every sybil until `stop`, counting the connections they hold in `counts`.
pub fn hold_sybils(
    swarms: Vec<libp2p::Swarm<libp2p::swarm::dummy::Behaviour>>,
    stop: &CancellationToken,
    counts: &SybilCounts,
) {
    for mut swarm in swarms {
        let (counts, stop) = (counts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut counted = false;
            loop {
                let event = tokio::select! {
                    e = swarm.select_next_some() => e,
                    () = stop.cancelled() => return,
                };
                match event {
                    libp2p::swarm::SwarmEvent::ConnectionEstablished { .. } if !counted => {
                        counted = true;
                        counts.connected.fetch_add(1, Ordering::SeqCst);
                    }
                    libp2p::swarm::SwarmEvent::ConnectionClosed { .. } if counted => {
                        counted = false;
                        counts.connected.fetch_sub(1, Ordering::SeqCst);
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    }
                    libp2p::swarm::SwarmEvent::OutgoingConnectionError { .. } => {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
    }
}

/// `count` sybils dialling `target` in waves of `wave` (a burst would mostly be turned away by
/// the pending-handshake limits; waves reach the established limits), held until `stop`.
pub async fn sybils_in_waves(
    target: &Multiaddr,
    count: usize,
    wave: usize,
    stop: &CancellationToken,
) -> SybilCounts {
    let counts = SybilCounts::default();
    let mut started = 0;
    while started < count && !stop.is_cancelled() {
        let mut swarms = Vec::new();
        for _ in 0..wave.min(count - started) {
            if let Some(s) = sybil(target.clone()).await {
                swarms.push(s);
            }
        }
        started += wave;
        hold_sybils(swarms, stop, &counts);
        let settled = Instant::now() + Duration::from_secs(5);
        while counts.settled() < started.min(count) && Instant::now() < settled {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    counts
}

/// Opens up to `count` inference streams to `target` that announce a 1 MiB request and send
/// nothing more; stops at the first stream that cannot be opened.
pub async fn stalled_streams(
    client: &mesh_node::network::Client,
    target: PeerId,
    count: usize,
) -> Vec<libp2p::Stream> {
    let mut stalled = Vec::new();
    for _ in 0..count {
        let protocol = libp2p::StreamProtocol::new(INFER_PROTOCOL);
        match client.open_stream(target, protocol).await {
            Ok(mut stream) => {
                let _ = stream
                    .write_all(&mesh_protocol::frame::encode_prefix(1 << 20))
                    .await;
                let _ = stream.flush().await;
                stalled.push(stream);
            }
            Err(_) => break,
        }
    }
    stalled
}

/// How many of `streams` the node answered with an `error` frame within `wait` each.
pub async fn refused(streams: &mut [libp2p::Stream], wait: Duration) -> usize {
    futures::stream::iter(streams.iter_mut())
        .filter_map(|s| async move {
            let r = tokio::time::timeout(
                wait,
                read_frame::<InferResponse, _>(s, DEFAULT_MAX_FRAME_LEN),
            )
            .await;
            matches!(r, Ok(Ok(Some(InferResponse::Error(_))))).then_some(())
        })
        .count()
        .await
}

/// Waits until `node`'s DHT names `count` providers of `model`, for at most `within`.
pub async fn until_providers(
    client: &mesh_node::network::Client,
    model: &str,
    count: usize,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let found = client.find_providers(model).await.unwrap_or_default();
        if found.len() >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the DHT names {} of {count} providers",
                found.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A network namespace joined to this one by a veth pair: this side `203.0.113.(4k+1)/30`, the
/// namespace's side `203.0.113.(4k+2)` (a documentation range). Needs root and `ip`; deleted on
/// drop.
pub struct Netns {
    name: String,
    host: std::net::Ipv4Addr,
    inside: std::net::Ipv4Addr,
}

impl Netns {
    /// A fresh namespace, or why there cannot be one here.
    pub fn create() -> Result<Netns, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        let k = (std::process::id() as usize + NEXT.fetch_add(1, Ordering::SeqCst)) % 64;
        let name = format!("mhst{}-{k}", std::process::id() % 100_000);
        let (outer, inner) = (
            format!("vh{k}x{}", std::process::id() % 10_000),
            format!("vn{k}"),
        );
        let host = std::net::Ipv4Addr::new(203, 0, 113, (4 * k + 1) as u8);
        let inside = std::net::Ipv4Addr::new(203, 0, 113, (4 * k + 2) as u8);
        let ns = Netns { name, host, inside };
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let (host_cidr, inside_cidr) = (format!("{host}/30"), format!("{inside}/30"));
        let name = ns.name.as_str();
        ip(&["netns", "add", name])?;
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", name,
        ])?;
        ip(&["addr", "add", &host_cidr, "dev", &outer])?;
        ip(&["link", "set", &outer, "up"])?;
        ip(&["-n", name, "addr", "add", &inside_cidr, "dev", &inner])?;
        ip(&["-n", name, "link", "set", &inner, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// This side's address, which a node listens on to be reached from the namespace.
    pub fn host_ip(&self) -> std::net::Ipv4Addr {
        self.host
    }

    /// The namespace's address: where what runs inside comes from.
    pub fn inside_ip(&self) -> std::net::Ipv4Addr {
        self.inside
    }

    /// Runs `work` on a thread of its own inside the namespace, on a runtime of its own.
    pub fn run<F, Fut, T>(&self, work: F) -> std::thread::JoinHandle<Result<T, String>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            // This thread only: its sockets are the namespace's from here on.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            Ok(runtime.block_on(work()))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so the pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
