//! mesh-node: everything a mesh node does. The `mesh` binary is a thin shell over this crate.
//!
//! - [`home`]: the data directory and its layout.
//! - [`identity`]: the node's ed25519 key, its PeerId, signatures.
//! - [`wire`]: protocol frames over async streams.
//! - [`engine`]: loaded models behind one trait.
//! - [`serve`]: answering inference and catalog streams, with admission control.
//! - [`call`]: the calling side of those streams.

pub mod call;
pub mod engine;
pub mod home;
pub mod identity;
pub mod serve;
pub mod wire;

pub use home::Home;
pub use identity::NodeIdentity;
