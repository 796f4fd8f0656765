//! The vhost-user-blk frontend: a volume as a virtio-blk disk for QEMU (and libvirt), served
//! from this process over a vhost-user unix socket.
//!
//! - [`request`]: virtio-blk request headers, discard segments and the configuration space,
//!   as pure functions (fuzzed).
//! - [`backend`]: [`BlkBackend`], the `vhost-user-backend` implementation: one worker thread
//!   per queue, EVENT_IDX, requests run on the tokio runtime against a `VolumeClient`.
//! - [`serve`]: accept a frontend, serve it until it leaves, accept the next (QEMU's
//!   `reconnect=`), for as long as the process runs.

pub mod backend;
pub mod request;

use std::path::Path;
use std::sync::Arc;

pub use backend::BlkBackend;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::volume::VolumeClient;

/// Serves `vc` on the vhost-user socket at `socket`, one frontend at a time, forever. Blocks
/// the calling thread (run it on a thread of its own); requests run on `rt`.
pub fn serve(
    vc: Arc<VolumeClient>,
    socket: &Path,
    queues: usize,
    rt: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=64).contains(&queues),
        "--queues must be between 1 and 64 (got {queues})"
    );
    let backend = Arc::new(BlkBackend::new(vc, queues, rt));
    loop {
        let mut daemon = VhostUserDaemon::new(
            "cairn-vhost-user-blk".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("vhost-user daemon: {e}"))?;
        tracing::info!(socket = %socket.display(), "waiting for a vhost-user frontend");
        match daemon.serve(socket) {
            Ok(()) => tracing::info!("frontend left; waiting for the next"),
            Err(e) => tracing::warn!(error = %e, "frontend session ended with an error"),
        }
    }
}
