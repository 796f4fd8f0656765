//! The client side of the data protocol (DESIGN.md §4): TCP, length-prefixed frames of a
//! prost header and a raw payload, many requests in flight per connection.
//!
//! - [`frame`]: the frame codec (pure, fuzzed; the storage node's server uses it too).
//! - [`client`]: a pipelined client.
//! - [`writer`]: a connection's writer task, batching the frames ready together.

pub mod client;
pub mod frame;
pub mod writer;

/// Protocol version spoken by this build; the handshake refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
pub const HELLO_MAGIC: &str = "cairn-data";
