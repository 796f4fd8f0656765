//! Cairn's wire types, and nothing else.
//!
//! - [`metadata`]: the prost/tonic types generated from `proto/cairn/metadata.proto` (the metadata
//!   service API and the member-to-member raft transport).
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

pub use domain::*;
