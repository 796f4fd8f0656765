//! The vhost-user-blk frontend: a volume as a virtio-blk disk for QEMU (and libvirt), served
//! from this process over a vhost-user unix socket.
//!
//! - [`request`]: virtio-blk request headers, discard segments and the configuration space,
//!   as pure functions (fuzzed).
//! - [`chain`]: split-virtqueue descriptor chains walked from their head (fuzzed).
//! - [`inflight`]: the inflight region (INFLIGHT_SHMFD) that QEMU keeps across backend
//!   restarts: which requests a killed backend left unfinished.
//! - [`backend`]: [`Blk`], a volume as a virtio-blk disk, and the request path from guest
//!   buffers to the `VolumeClient` and back.
//! - [`device`]: [`Device`], the vhost-user device side of one connection: guest memory,
//!   queues with a tokio task each, EVENT_IDX, requests completed out of order.
//! - [`serve`]: accept a frontend, serve it until it leaves, accept the next (QEMU's
//!   `reconnect=`), for as long as the process runs.

pub mod backend;
pub mod chain;
pub mod device;
pub mod inflight;
pub mod request;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use backend::Blk;
pub use device::Device;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::volume::VolumeClient;

/// Serves `vc` on the vhost-user socket at `socket`, one frontend at a time, forever. Blocks
/// the calling thread (run it on a thread of its own, not a runtime thread); requests run on
/// `rt`.
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
    // A socket left by an earlier backend is replaced; anything else at the path is not ours.
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket",
            socket.display()
        );
        std::fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", socket.display()))?;
    let blk = Arc::new(Blk::new(vc, queues as u16));
    loop {
        tracing::info!(socket = %socket.display(), "waiting for a vhost-user frontend");
        let (stream, _) = listener.accept()?;
        let device = Arc::new(Mutex::new(Device::new(blk.clone(), rt.clone())));
        let mut handler = BackendReqHandler::from_stream(stream, device.clone());
        let why = loop {
            if let Err(e) = handler.handle_request() {
                break e;
            }
        };
        match why {
            VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_) => {
                tracing::info!("frontend left");
            }
            e => tracing::warn!(error = %e, "frontend session ended with an error"),
        }
        // Requests still running finish (returning nothing) before the next frontend comes.
        device.lock().expect("device lock").shutdown();
    }
}
