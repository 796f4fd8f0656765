//! The client side of the data protocol (DESIGN.md §4): TCP, length-prefixed frames of a
//! prost header and a raw payload, many requests in flight per connection.
//!
//! A node on the client's own host is reached over a Unix socket instead (the same frames):
//! each node also listens on the abstract socket [`local_socket_name`] of the address it
//! advertises, and a client tries that first. It uses it only if the process behind it runs
//! as root or as the client's own user: such names are open to every user of the host.
//! Loopback TCP costs both ends the whole TCP stack (segments, ACKs, the receive softirq) for
//! every frame, a Unix socket only a copy and a wake-up; on a hyperconverged host the local
//! replica is one member of every group placed there. Abstract names live in the network
//! namespace, not the filesystem: nothing to clean up after a crash, and a client in another
//! namespace (a container) simply finds none and uses TCP.
//!
//! - [`frame`]: the frame codec (pure, fuzzed; the storage node's server uses it too).
//! - [`client`]: a pipelined client.
//! - [`local`]: the Unix socket transport to a node on this host.
//! - [`inproc`]: nodes of this very process, called without a socket (a node that also runs
//!   the host's frontends).
//! - [`writer`]: a connection's writer task, batching the frames ready together, and the
//!   helpers that let ready tasks run first.
//!
//! [`tcp_session`] sets up every long-lived TCP connection of Cairn's data path (to and from
//! storage nodes, and NBD clients): no Nagle delay, and keepalive probes.

pub mod client;
pub mod frame;
pub mod inproc;
pub mod local;
pub mod writer;

/// Sets up a long-lived TCP connection: TCP_NODELAY (requests and answers are small and
/// latency is the product), and keepalive probes. A peer whose host lost power or its network
/// sends no FIN, and without probes its connection stays open for good on this end: a node
/// kept a task and a descriptor per connection of a gateway that died, and a gateway kept the
/// volume of an NBD client that died attached, its lease held. With probes
/// ([`cairn_proto::keepalive`]) the connection is reset about a minute after the peer went
/// silent, and its reader sees the error like any other.
pub fn tcp_session(s: &tokio::net::TcpStream) -> std::io::Result<()> {
    use cairn_proto::keepalive::{IDLE, INTERVAL, PROBES};
    s.set_nodelay(true)?;
    socket2::SockRef::from(s).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(IDLE)
            .with_interval(INTERVAL)
            .with_retries(PROBES),
    )
}

/// Protocol version spoken by this build; the handshake refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
pub const HELLO_MAGIC: &str = "cairn-data";

/// The abstract Unix socket (leading NUL) on which the node advertising `addr` also listens.
/// Only the process holding `addr`'s TCP listener can have bound it first, so the name finds
/// that node (and a request names its disk, which another node would not have).
pub fn local_socket_name(addr: &str) -> String {
    format!("\0cairn-data/{addr}")
}
