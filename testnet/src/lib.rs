//! Local testnets and benchmarks: nodes on loopback, in this process or as `mesh` processes.
//!
//! - [`inprocess`]: real libp2p nodes in this process, for tests and benchmarks.
//! - [`bench`]: what `mesh-bench` measures.
//! - [`attack`]: hostile peers, for tests and benchmarks.
//! - [`sim`]: many nodes in one process over the memory transport (`mesh-sim`).
//!
//! `testnet/testnet.sh` drives `mesh` processes.

pub mod attack;
pub mod bench;
pub mod inprocess;
pub mod sim;
