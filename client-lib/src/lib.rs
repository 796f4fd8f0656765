//! Cairn's client library.
//!
//! - [`meta`]: [`MetaClient`], the metadata-service client that finds and follows the raft
//!   leader, retrying through elections, so callers see one logical service.
//! - [`data`]: the data protocol's frame codec, the connection writer (frames batched, payloads
//!   sent without a copy) and a pipelined client for storage nodes, over TCP or, to a node on
//!   this host, a Unix socket, or to a node of this very process by direct calls
//!   ([`data::inproc`]); the setup of every long-lived TCP connection (no Nagle delay,
//!   keepalive probes).
//!
//! - [`volume`]: [`VolumeClient`], one attached volume: the lease and its generation (fencing
//!   the previous holder, then reconciling what it may have left half-written), the layout,
//!   writes to every member that takes them (a failed member reported and written around),
//!   reads from the nearest good active one with repair of a bad copy. One async API for every
//!   frontend.
//! - [`nbd`]: the NBD server ([`nbd::NbdServer`]) on top of it.
//! - [`vhost`]: the vhost-user-blk backend ([`vhost::Device`], [`vhost::Blk`]) on top of it,
//!   with in-flight request tracking across backend restarts.

pub mod data;
pub mod meta;
pub mod nbd;
pub mod vhost;
pub mod volume;

pub use meta::{MetaClient, MetaClientError};
pub use volume::{AttachOptions, VolumeClient, VolumeError};
