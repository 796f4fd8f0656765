//! Cairn's storage node: chunks with per-block CRC32C on the server's local disks.
//!
//! Modules:
//! - [`format`]: the versioned on-disk superblock (magic, format version, disk uuid, CRC).
//! - [`engine`]: the `ChunkEngine` seam and its implementations — [`engine::disk::DiskEngine`]
//!   (slots on a disk file or block device, O_DIRECT, group-committed fdatasync, chunk index in
//!   RocksDB with crash-recoverable write intents) and [`engine::mem::MemEngine`] (in memory) —
//!   held to one conformance suite ([`engine::conformance`]).
//!
//! Contract: an acknowledged write is on media; every read is checked against the block's
//! CRC32C; a crash leaves every block with its old or its new data, and a block that is
//! neither is reported as torn, never returned and never reported as corruption.
//!
//! Still to come (issue 3): the io_uring engine, the fault-injecting engine, the data-protocol
//! server and `cairn node run`.

pub mod engine;
pub mod format;

pub use engine::{ChunkEngine, ChunkId, EngineError};
