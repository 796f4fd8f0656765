//! `cairn nbd serve`, `cairn vhost serve` and `cairn debug read-replica`: the client
//! library's frontends as commands.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use cairn_client::nbd::NbdServer;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};

use crate::args::{DebugCommand, NbdServeArgs, VhostServeArgs};

fn this_host() -> anyhow::Result<String> {
    Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned())
}

/// An NBD server listening on a TCP address and/or a Unix socket: `cairn nbd serve`'s, or the
/// one a storage node runs for its host (`cairn node run --nbd-listen`).
pub struct NbdGateway {
    server: Arc<NbdServer>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl NbdGateway {
    /// Listens, and serves every volume as an export attached as this host's holder.
    pub async fn start(
        listen: Option<SocketAddr>,
        socket: Option<&Path>,
        meta: &[String],
        host: &str,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            listen.is_some() || socket.is_some(),
            "nothing to listen on: give --listen IP:PORT and/or --socket PATH"
        );
        let holder = format!(
            "nbd:{host}:{}",
            listen
                .map(|l| l.to_string())
                .or_else(|| socket.map(|p| p.display().to_string()))
                .unwrap_or_default()
        );
        let server = NbdServer::new(meta, &holder, host)?;
        let mut tasks = Vec::new();
        if let Some(addr) = listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            tracing::info!(%addr, "serving NBD");
            tasks.push(tokio::spawn(server.clone().serve_tcp(l)));
        }
        if let Some(path) = socket {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing old {}", path.display()))
                }
            }
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("listening on {}", path.display()))?;
            tracing::info!(socket = %path.display(), "serving NBD");
            tasks.push(tokio::spawn(server.clone().serve_unix(l)));
        }
        Ok(Self {
            server,
            tasks,
            socket: socket.map(Path::to_path_buf),
        })
    }

    /// Stops listening and gives back every lease held.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.server.shutdown().await;
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves NBD on the given TCP address and/or unix socket until SIGINT/SIGTERM, then gives
/// back every lease it holds.
pub async fn nbd_serve(a: NbdServeArgs, meta: &[String]) -> anyhow::Result<()> {
    let host = match a.host {
        Some(h) => h,
        None => this_host()?,
    };
    let gateway = NbdGateway::start(a.listen, a.socket.as_deref(), meta, &host).await?;
    crate::commands::shutdown_signal().await;
    gateway.stop().await;
    Ok(())
}

/// Attaches the volume, serves it over vhost-user until SIGINT/SIGTERM, then gives the lease
/// back.
pub async fn vhost_serve(a: VhostServeArgs, meta: &[String]) -> anyhow::Result<()> {
    let host = match a.host {
        Some(h) => h,
        None => this_host()?,
    };
    anyhow::ensure!(
        (1..=64).contains(&a.queues),
        "--queues must be between 1 and 64 (got {})",
        a.queues
    );
    let opts = AttachOptions {
        holder: format!("vhost:{host}:{}", a.socket.display()),
        force: a.force,
        host,
    };
    let vc = VolumeClient::attach(MetaClient::new(meta)?, &a.volume, opts).await?;
    match std::fs::remove_file(&a.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing old {}", a.socket.display())),
    }
    let rt = tokio::runtime::Handle::current();
    let (socket, queues, served) = (a.socket.clone(), a.queues, vc.clone());
    // A plain thread (it blocks in accept and recvmsg for as long as the process lives): the
    // process ends when main returns, whatever it is doing; a blocking-pool task would hold
    // the runtime's shutdown.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let r = cairn_client::vhost::serve(served, &socket, queues, rt);
            let _ = done_tx.send(r);
        })?;
    tracing::info!(volume = %a.volume, socket = %a.socket.display(), queues = a.queues, "serving vhost-user-blk");
    let ended = tokio::select! {
        _ = crate::commands::shutdown_signal() => None,
        r = done_rx => Some(r),
    };
    let detached = vc.detach().await;
    let _ = std::fs::remove_file(&a.socket);
    match ended {
        Some(Ok(Err(e))) => return Err(e),
        Some(Err(_)) => anyhow::bail!("the vhost-user server thread died"),
        Some(Ok(Ok(()))) | None => {}
    }
    detached?;
    Ok(())
}

pub async fn debug(cmd: DebugCommand, meta: &[String]) -> anyhow::Result<()> {
    match cmd {
        DebugCommand::ReadReplica {
            volume,
            offset,
            len,
            node,
            out,
            force,
        } => {
            let offset = cairn_proto::parse_size(&offset).map_err(anyhow::Error::msg)?;
            let len = cairn_proto::parse_size(&len).map_err(anyhow::Error::msg)?;
            let opts = AttachOptions {
                holder: format!("debug:{}", this_host()?),
                force,
                host: this_host()?,
            };
            let vc = VolumeClient::attach(MetaClient::new(meta)?, &volume, opts).await?;
            let result = async {
                let mut sink: Box<dyn Write> = match &out {
                    Some(p) => Box::new(
                        std::fs::File::create(p)
                            .with_context(|| format!("creating {}", p.display()))?,
                    ),
                    None => Box::new(std::io::stdout().lock()),
                };
                // In pieces, so a large range does not sit in memory at once.
                let step = 16 << 20;
                let mut at = offset;
                while at < offset + len {
                    let n = step.min(offset + len - at);
                    sink.write_all(&vc.read_replica(at, n, node).await?)?;
                    at += n;
                }
                sink.flush()?;
                anyhow::Ok(())
            }
            .await;
            let detached = vc.detach().await;
            result?;
            detached?;
            Ok(())
        }
    }
}
