//! Local testnets: nodes on loopback, in this process or as `mesh` processes.
//!
//! The NAT lab (network namespaces) is driven by `testnet/testnet.sh`.

pub mod inprocess;
