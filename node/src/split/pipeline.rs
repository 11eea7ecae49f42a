//! A split call's forward pass: the head's own layers, then each hop's, and back to the head,
//! behind the engine's [`Feed`].
//!
//! The head keeps every hidden state it sent to each hop. When a hop fails (its node dies, its
//! stream breaks, it stalls past the step timeout), the head opens a session with another node
//! that holds those layers, replays the states into it to rebuild its cache, and sends the
//! step again: the caller's stream goes on with the same tokens. With no node left for the
//! layers, the call fails with an error that names the lost stage.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::PeerId;
use mesh_protocol::{ErrorCode, StageUse, WireError};
use tokio_util::sync::CancellationToken;

use super::link::{LinkError, SessionSpec, StageLink};
use super::Mesh;
use crate::engine::gguf::Feed;
use crate::engine::llama::{Hidden, KvCache, Llama, PREFILL_CHUNK};

/// Replacements one hop may take in one call.
pub const MAX_REPLACEMENTS: usize = 3;
/// Longest search for a node to replace a lost stage, when the plan's spares are spent.
pub const REPLACEMENT_SEARCH: Duration = Duration::from_secs(10);

/// One hop of a call under way.
pub(super) struct HopState {
    pub(super) link: StageLink,
    pub(super) spares: Vec<PeerId>,
    /// Every hidden state sent to these layers, in position order, to replay into a
    /// replacement.
    sent: Vec<f32>,
    /// Earlier nodes that ran these layers in this call and failed.
    pub(super) retired: Vec<StageUse>,
    replacements: usize,
}

impl HopState {
    pub(super) fn new(link: StageLink, spares: Vec<PeerId>) -> HopState {
        HopState {
            link,
            spares,
            sent: Vec::new(),
            retired: Vec::new(),
            replacements: 0,
        }
    }
}

/// The forward pass of one split call.
pub(super) struct Pipeline<'a> {
    pub(super) head: &'a Llama,
    pub(super) cache: KvCache,
    pub(super) hops: Vec<HopState>,
    pub(super) mesh: &'a Mesh,
    pub(super) spec: SessionSpec,
    pub(super) failed: HashSet<PeerId>,
}

impl Feed for Pipeline<'_> {
    fn feed(&mut self, tokens: &[u32], cancel: &CancellationToken) -> Result<Vec<f32>, WireError> {
        let internal = |e: String| WireError::new(ErrorCode::Internal, e);
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            if cancel.is_cancelled() {
                return Err(crate::engine::cancelled());
            }
            let mut hidden = self.head.embed(chunk).map_err(internal)?;
            self.head
                .forward_layers(&mut self.cache, &mut hidden)
                .map_err(internal)?;
            for k in 0..self.hops.len() {
                hidden = self.run_hop(k, hidden)?;
            }
            last = Some(hidden);
        }
        let hidden = last.ok_or_else(|| internal("no tokens to run".into()))?;
        self.head.logits(&hidden, hidden.rows - 1).map_err(internal)
    }
}

impl Pipeline<'_> {
    /// `hidden` through hop `k`, replacing its node as long as one fails and another is left.
    fn run_hop(&mut self, k: usize, hidden: Hidden) -> Result<Hidden, WireError> {
        loop {
            let handle = self.mesh.handle()?;
            let hop = &mut self.hops[k];
            match handle.block_on(hop.link.step(&hidden)) {
                Ok(out) => {
                    hop.sent.extend_from_slice(&hidden.data);
                    return Ok(out);
                }
                Err(e) => self.replace(k, e)?,
            }
        }
    }

    /// Puts another node in place of hop `k`'s, which failed with `error`, and replays the
    /// hop's states into it.
    fn replace(&mut self, k: usize, error: LinkError) -> Result<(), WireError> {
        tracing::warn!("{error}; looking for another node with these layers");
        let handle = self.mesh.handle()?;
        let client = self.mesh.client()?;
        self.failed.insert(error.peer);
        let layers = self.hops[k].link.layers;
        let lost = |why: &str| {
            WireError::new(
                ErrorCode::Internal,
                format!("{error}, and {why} (the call cannot go on without layers {layers})"),
            )
        };
        if self.hops[k].replacements >= MAX_REPLACEMENTS {
            return Err(lost(&format!(
                "its layers failed {MAX_REPLACEMENTS} times in this call"
            )));
        }
        self.hops[k].replacements += 1;
        let mut candidates: Vec<PeerId> = self.hops[k]
            .spares
            .iter()
            .filter(|p| !self.failed.contains(p))
            .copied()
            .collect();
        if candidates.is_empty() {
            let search = super::discover(&client, &self.spec.weights_sha256);
            let hosts = handle
                .block_on(tokio::time::timeout(REPLACEMENT_SEARCH, search))
                .unwrap_or_default();
            candidates = hosts
                .into_iter()
                .filter(|h| h.card.layers.is_some_and(|l| l.contains(&layers)))
                .filter(|h| !self.failed.contains(&h.peer))
                .map(|h| h.peer)
                .collect();
        }
        let width = self.head.config().width;
        for peer in candidates {
            let replay = async {
                let mut link = StageLink::open(&client, peer, layers, &self.spec).await?;
                for rows in self.hops[k].sent.chunks(PREFILL_CHUNK * width) {
                    let states = Hidden {
                        rows: rows.len() / width,
                        data: rows.to_vec(),
                    };
                    link.step(&states).await?;
                }
                Ok::<_, LinkError>(link)
            };
            match handle.block_on(replay) {
                Ok(link) => {
                    tracing::info!(%peer, %layers, positions = link.positions, "a replacement stage took over");
                    let old = std::mem::replace(&mut self.hops[k].link, link);
                    self.hops[k].retired.push(stage_use(&old, false));
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!("replacement failed: {e}");
                    self.failed.insert(peer);
                }
            }
        }
        Err(lost("no other node runs those layers"))
    }
}

/// What the head reports about one node's part in a call (its receipt's hash is added when
/// the session closes).
pub(super) fn stage_use(link: &StageLink, replacement: bool) -> StageUse {
    StageUse {
        peer: link.peer.to_bytes(),
        layers: link.layers,
        receipt_sha256: None,
        steps: link.steps,
        wait_ms: link.wait.as_millis() as u64,
        path: link.path.as_str().to_string(),
        replacement,
    }
}

/// The hash a head's receipt names a stage's signed receipt by.
pub(super) fn receipt_digest(receipt: &mesh_protocol::SignedStageReceipt) -> Vec<u8> {
    use sha2::Digest;
    let bytes = mesh_protocol::frame::encode_body(receipt).expect("a receipt always encodes");
    sha2::Sha256::digest(bytes).to_vec()
}
