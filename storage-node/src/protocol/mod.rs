//! The data protocol between the client library and storage nodes (DESIGN.md §4): TCP,
//! length-prefixed frames of a prost header and a raw payload, pipelined.
//!
//! - [`request`]: validation of request headers into domain requests (pure, fuzzed).
//! - [`server`]: the node's server, with fencing by generation and epoch.
//!
//! The frame codec and the client are in `cairn_client::data`, shared with the client library.

pub mod request;
pub mod server;

pub use cairn_client::data::{frame, HELLO_MAGIC, PROTOCOL_VERSION};
