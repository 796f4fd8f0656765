//! Storage nodes served by this very process.
//!
//! On a hyperconverged host the frontends (NBD, vhost-user-blk) can run inside the host's own
//! storage node (`cairn node run --nbd-listen …`), the way Mayastor's nexus reaches its local
//! replica as a bdev. A request to that node is then a function call on the node's runtime:
//! no socket, no frame encoded or decoded, no copy, no system call and no wake-up of another
//! process. On this project's 2-vCPU machine every system call and process wake-up costs tens
//! of microseconds (BENCHMARKS.md, session 13), and a read from the local replica made two of
//! each through a Unix socket.
//!
//! A node registers itself under the address it advertises ([`register`]); a
//! [`DataClient`](super::client::DataClient) connecting to that address finds it here first.
//! Nothing else changes: the node validates, fences and executes the request exactly as its
//! server does for a connection, and the client keeps its time limits, so the fencing, epoch
//! and failure handling of `VolumeClient` are the same for the local member as for the others.
//! Only nodes that ask are registered, so tests running several nodes in one process still
//! talk to them over sockets unless they opt in.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::Bytes;
use cairn_proto::data as pb;
use foldhash::HashMap;
use tokio::runtime::Handle;

/// A request's answer: the response and its payload.
pub type Answer = (pb::Response, Bytes);

/// A storage node that answers requests of clients in its own process.
pub trait InProcessNode: Send + Sync + 'static {
    /// Validates, fences and runs one request, as the node's server does for one off a
    /// connection, and answers it. The request's id and payload checksum are set. The future
    /// runs on the runtime the node registered from (its disks' io_uring rings take
    /// submissions from that runtime's threads only).
    fn call(
        &self,
        req: pb::Request,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send>>;

    /// The node's uuid, as its handshake would tell a client.
    fn node_uuid(&self) -> &str;
}

/// A node of this process, as the registry and its clients hold it: the node goes away with
/// its registration, after which calls fail as on a closed connection.
#[derive(Clone)]
pub(crate) struct Found {
    pub node: Weak<dyn InProcessNode>,
    pub runtime: Handle,
}

/// The nodes of this process, by advertised address.
static NODES: LazyLock<Mutex<HashMap<String, Found>>> = LazyLock::new(Default::default);

/// Keeps a node reachable in-process; dropping it unregisters the node. In-flight calls
/// finish; later ones fail as on a closed connection, and the client reconnects over a socket.
pub struct Registration {
    addr: String,
    _node: Arc<dyn InProcessNode>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("a node of this process already serves {0} in-process")]
    Taken(String),
    #[error("registering an in-process node needs a tokio runtime: {0}")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
}

/// Makes `node` reachable in-process under `addr` (the address it advertises), its calls run
/// on the current runtime.
pub fn register(addr: &str, node: Arc<dyn InProcessNode>) -> Result<Registration, RegisterError> {
    let runtime = Handle::try_current().map_err(RegisterError::NoRuntime)?;
    let mut nodes = NODES.lock().expect("in-process nodes lock");
    if nodes.get(addr).is_some_and(|e| e.node.strong_count() > 0) {
        return Err(RegisterError::Taken(addr.to_owned()));
    }
    nodes.insert(
        addr.to_owned(),
        Found {
            node: Arc::downgrade(&node),
            runtime,
        },
    );
    Ok(Registration {
        addr: addr.to_owned(),
        _node: node,
    })
}

impl Drop for Registration {
    fn drop(&mut self) {
        NODES
            .lock()
            .expect("in-process nodes lock")
            .remove(&self.addr);
    }
}

/// The node of this process registered under `addr`, if any.
pub(crate) fn find(addr: &str) -> Option<Found> {
    let nodes = NODES.lock().expect("in-process nodes lock");
    nodes
        .get(addr)
        .filter(|e| e.node.strong_count() > 0)
        .cloned()
}
