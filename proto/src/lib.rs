//! Cairn's wire types, and nothing else.
//!
//! - [`metadata`]: the prost/tonic types generated from `proto/cairn/metadata.proto` (the metadata
//!   service API and the member-to-member raft transport).
//! - [`data`]: the prost types of the data protocol (`proto/cairn/data.proto`): handshake,
//!   request and response headers; framing lives with the server in `cairn-storage-node`.
//! - [`domain`]: validated domain types (`VolumeName`, `VolumeSize`, `PoolSpec`, …). A receiver
//!   converts every prost message into these with `TryFrom` before service code sees it, so
//!   "expect all sorts of junk from senders" is handled once, here.
//!
//! Contract: no logic beyond validation and conversion; no I/O.

pub mod domain;

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
