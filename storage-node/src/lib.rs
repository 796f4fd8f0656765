//! Cairn's storage node: chunks with per-block CRC32C on the server's local disks.
//!
//! Modules:
//! - [`mod@format`]: the versioned on-disk superblock (magic, format version, disk uuid, log
//!   region, CRC).
//! - [`engine`]: the `ChunkEngine` seam and its implementations — [`engine::disk::DiskEngine`]
//!   (slots on a disk file or block device, O_DIRECT; every change first goes to the disk's own
//!   write-ahead log, [`engine::log`], batched into one durable write per group commit: small
//!   writes with their data, larger ones as crash-recoverable intents; the chunk index in
//!   RocksDB is brought up to date at checkpoints, [`engine::replay`] rebuilds the state at
//!   open) and [`engine::mem::MemEngine`] (in memory) — held to one conformance suite
//!   (`engine::conformance`); the disk engine runs over io_uring (one ring per disk, driven
//!   from the runtime's threads, registered buffers; on the default one-thread runtime its
//!   completion work waits for our own enters and wakes the node only when someone waits for
//!   it, see [`engine::uring`]) or pread/pwrite.
//!
//! Contract: an acknowledged write is on media; every read is checked against the block's
//! CRC32C; a crash leaves every block with its old or its new data, and a block that is
//! neither is reported as torn, never returned and never reported as corruption.
//!
//! - [`engine::fault`]: a fault-injecting wrapper for tests (EIO, ENOSPC, torn writes, latency).
//! - [`protocol`]: the data protocol server (on TCP, on a Unix socket for clients on this
//!   host, and by direct calls for clients in this very process: frontends run inside the
//!   node, [`protocol::server::InProcess`]) and its request validation (the frame codec, the
//!   writer, the Unix transport and the client are in `cairn_client::data`).
//! - [`fence`]: the persisted generation / epoch marks that fence stale writers.
//! - [`marks`]: keys made durable in RocksDB once, before the first operation needing them,
//!   off the runtime's threads (the activity and dirty records are built on it).
//! - [`activity`]: the chunks with writes that may not have reached every member, which the
//!   next attach reconciles after a client crash.
//! - [`resync`]: bringing a group member that missed writes up to date — the per-group
//!   record of chunks written while degraded, the epoch barrier, and the copy of exactly
//!   those chunks.
//! - [`scrub`]: the background scrub — every block checked against its CRC, every replica's
//!   CRCs compared, a bad copy sent to the resync to be repaired, and reported.
//!
//! - [`node`]: the daemon behind `cairn node run` — disks, server, registration, heartbeats;
//!   [`Node::serve_in_process`] opens it to the frontends of its own process.
//!
//! Fuzz targets for the frame decoder, request validation, the superblock and log batch
//! decoders are in
//! `fuzz/`; the engine-vs-fio benchmark is `benches/engine/run`.

pub mod activity;
pub mod engine;
pub mod fence;
pub mod format;
pub mod marks;
pub mod node;
pub mod protocol;
pub mod resync;
pub mod scrub;

pub use engine::{ChunkEngine, ChunkId, EngineError};
pub use node::{DiskSpec, Node, NodeConfig};
