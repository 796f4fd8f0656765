//! The NBD frontend: a volume as an NBD export, for QEMU, qemu-img, nbdcopy, nbdinfo, fio and
//! the kernel's nbd client.
//!
//! - [`proto`]: the wire format — constants, pure parsers and encoders (fuzzed: `fuzz/nbd`).
//! - [`server`]: [`NbdServer`], handshake, option haggling and the pipelined transmission
//!   phase over a `VolumeClient` per export.

pub mod proto;
pub mod server;

pub use server::NbdServer;
