//! Cairn's client library.
//!
//! - [`meta`]: [`MetaClient`], the metadata-service client that finds and follows the raft
//!   leader, retrying through elections, so callers see one logical service.
//! - [`data`]: the data protocol's frame codec and a pipelined client for storage nodes.
//!
//! Coming with the replicated-volumes issue: `VolumeClient` (attach with a lease, layout cache,
//! replicated reads and writes) and the NBD and vhost-user-blk frontends on top of it.

pub mod data;
pub mod meta;

pub use meta::{MetaClient, MetaClientError};
