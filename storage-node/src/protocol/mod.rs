//! The data protocol between the client library and storage nodes (DESIGN.md §4): TCP,
//! length-prefixed frames of a prost header and a raw payload, pipelined.
//!
//! - [`frame`]: the frame codec (pure, fuzzed).
//! - [`request`]: validation of request headers into domain requests (pure, fuzzed).
//! - [`server`]: the node's server, with fencing by generation and epoch.
//! - [`client`]: a pipelined client.

pub mod client;
pub mod frame;
pub mod request;
pub mod server;

/// Protocol version spoken by this build; the handshake refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
pub const HELLO_MAGIC: &str = "cairn-data";
