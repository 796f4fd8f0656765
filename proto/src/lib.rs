//! Cairn's wire types, and nothing else.
//!
//! - [`metadata`]: the prost/tonic types generated from `proto/cairn/metadata.proto` (the metadata
//!   service API and the member-to-member raft transport).
//! - [`data`]: the prost types of the data protocol (`proto/cairn/data.proto`): handshake,
//!   request and response headers; framing lives with the server in `cairn-storage-node`.
//! - [`domain`]: validated domain types (`VolumeName`, `VolumeSize`, `PoolSpec`, …). A receiver
//!   converts every prost message into these with `TryFrom` before service code sees it, so
//!   "expect all sorts of junk from senders" is handled once, here.
//! - [`keepalive`]: the TCP keepalive of every long-lived connection (data path, metadata API,
//!   raft between members), one setting for all of them.
//!
//! Contract: no logic beyond validation and conversion; no I/O.

pub mod domain;

/// TCP keepalive of every long-lived Cairn connection. A peer whose host lost power or its
/// network sends no FIN; without probes its connection stays open for good on this end. With
/// them it is reset about [`IDLE`](keepalive::IDLE) + [`PROBES`](keepalive::PROBES) ×
/// [`INTERVAL`](keepalive::INTERVAL) (a minute) after the peer went silent.
pub mod keepalive {
    use std::time::Duration;

    /// Silence on a connection after which the kernel starts probing its peer.
    pub const IDLE: Duration = Duration::from_secs(30);
    /// Between probes.
    pub const INTERVAL: Duration = Duration::from_secs(10);
    /// Unanswered probes after which the connection is reset.
    pub const PROBES: u32 = 3;
}

/// Generated from `proto/cairn/metadata.proto`.
#[allow(clippy::all, missing_docs)]
pub mod metadata {
    tonic::include_proto!("cairn.metadata.v1");
}

/// Generated from `proto/cairn/data.proto`: the storage nodes' data protocol.
#[allow(clippy::all, missing_docs)]
pub mod data {
    include!(concat!(env!("OUT_DIR"), "/cairn.data.v1.rs"));
}

pub use domain::*;
