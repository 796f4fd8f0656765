//! The commands: each parses its arguments into a request, makes one call through
//! `cairn_client::MetaClient`, and prints the answer.

use std::path::Path;

use anyhow::{bail, Context};
use cairn_client::MetaClient;
use cairn_metadata::{MetaConfig, MetaConfigFile};
use cairn_proto::metadata as pb;
use cairn_proto::metadata::metadata_client::MetadataClient;
use cairn_proto::parse_size;

use crate::args::{
    Cli, Command, MetaCommand, MetaRunArgs, NbdCommand, NodeCommand, NodeRunArgs, VhostCommand,
    VolumeCommand,
};
use crate::output::{self, Printer};
use crate::up;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Printer { json: cli.json };
    match cli.command {
        Command::Up(a) => up::run(a).await,
        Command::Meta {
            command: MetaCommand::Run(a),
        } => meta_run(a).await,
        Command::Node {
            command: NodeCommand::Run(a),
        } => node_run(a, &cli.meta).await,
        Command::Meta { command } => {
            let addrs = meta_addrs(&cli.meta)?;
            meta_command(command, &addrs, &out).await
        }
        Command::Volume { command } => {
            let client = MetaClient::new(&meta_addrs(&cli.meta)?)?;
            volume(command, &client, &out).await
        }
        Command::Nbd {
            command: NbdCommand::Serve(a),
        } => crate::gateway::nbd_serve(a, &meta_addrs(&cli.meta)?).await,
        Command::Vhost {
            command: VhostCommand::Serve(a),
        } => crate::gateway::vhost_serve(a, &meta_addrs(&cli.meta)?).await,
        Command::Debug { command } => crate::gateway::debug(command, &meta_addrs(&cli.meta)?).await,
        Command::Bench(a) => crate::bench::run(a, &meta_addrs(&cli.meta)?, &out).await,
        Command::Status => {
            let client = MetaClient::new(&meta_addrs(&cli.meta)?)?;
            let s = client
                .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
                .await?;
            out.status(&s)
        }
    }
}

/// `--meta` / `CAIRN_META`, else the metadata members of `./cairn-data/cluster.json`.
pub fn meta_addrs(given: &[String]) -> anyhow::Result<Vec<String>> {
    let given: Vec<String> = given
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if !given.is_empty() {
        return Ok(given);
    }
    let path = Path::new("./cairn-data/cluster.json");
    if path.exists() {
        let addrs = up::ClusterFile::load(path)?.meta_addrs();
        if !addrs.is_empty() {
            return Ok(addrs);
        }
    }
    bail!("no metadata address: pass --meta ADDR[,ADDR…], set CAIRN_META, or run `cairn up` here first")
}

async fn meta_run(a: MetaRunArgs) -> anyhow::Result<()> {
    let file = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let mut f = MetaConfigFile::from_toml(&text).map_err(anyhow::Error::msg)?;
            f.join |= a.join;
            f
        }
        None => {
            let defaults = MetaConfigFile::from_toml(&format!(
                "id = {}\nlisten = {:?}\ndata_dir = {:?}\npeers = []",
                a.id.unwrap_or(0),
                a.listen.clone().unwrap_or_default(),
                a.data_dir.clone().unwrap_or_default()
            ))
            .map_err(anyhow::Error::msg)?;
            MetaConfigFile {
                advertise: a.advertise.clone(),
                peers: a.peers.clone(),
                join: a.join,
                compact_threshold: a.compact_threshold.unwrap_or(defaults.compact_threshold),
                tick_ms: a.tick_ms.unwrap_or(defaults.tick_ms),
                lease_ttl_ms: a.lease_ttl_ms.unwrap_or(defaults.lease_ttl_ms),
                replace_after_ms: a.replace_after_ms.unwrap_or(defaults.replace_after_ms),
                ..defaults
            }
        }
    };
    let cfg: MetaConfig = file.parse_and_validate().map_err(anyhow::Error::msg)?;
    cairn_metadata::failpoints::setup_from_env();
    let server = cairn_metadata::Server::start(cfg).await?;
    server.run_until(shutdown_signal()).await
}

async fn node_run(a: NodeRunArgs, meta: &[String]) -> anyhow::Result<()> {
    let host = match a.host {
        Some(h) => h,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let cfg = cairn_storage_node::NodeConfig {
        data_dir: a.data_dir,
        listen: a.listen,
        advertise: a.advertise,
        disks: a.disks,
        meta: meta
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        rack: if a.rack.is_empty() {
            host.clone()
        } else {
            a.rack
        },
        site: if a.site.is_empty() {
            "default".into()
        } else {
            a.site
        },
        host,
        heartbeat: std::time::Duration::from_secs(2),
        resync_every: std::time::Duration::from_secs(1),
        resync_rate: a.resync_mb_per_s << 20,
        slow_disk: std::time::Duration::from_millis(a.slow_disk_ms),
        isolate_disk: std::time::Duration::from_millis(a.isolate_disk_ms),
        fence_after: std::time::Duration::from_millis(a.fence_after_ms),
        scrub: cairn_storage_node::scrub::ScrubConfig {
            every: std::time::Duration::from_secs(a.scrub_every_s),
            rate: a.scrub_mb_per_s << 20,
            recheck: std::time::Duration::from_secs(1),
        },
    };
    let gateway = a.nbd_listen.is_some() || a.nbd_socket.is_some();
    anyhow::ensure!(
        !gateway || !cfg.meta.is_empty(),
        "--nbd-listen and --nbd-socket need the metadata service (--meta ADDR or CAIRN_META): \
         the gateway attaches volumes through it"
    );
    let host = cfg.host.clone();
    let meta = cfg.meta.clone();
    // Failpoints from FAILPOINTS (builds with the `failpoints` feature; tests only).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let mut node = cairn_storage_node::Node::start(cfg).await?;
    let gateway = if gateway {
        // NBD clients are let in once the node serves: until it has heard from the metadata
        // service, every request the gateway sent to it would be refused, and a write would
        // count it as a failed member.
        let ready = async {
            while !node.server.ready.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = ready => {}
            _ = shutdown_signal() => {
                node.shutdown().await;
                return Ok(());
            }
        }
        // The gateway's requests to this node are function calls on this runtime.
        let started = async {
            node.serve_in_process()?;
            crate::gateway::NbdGateway::start(a.nbd_listen, a.nbd_socket.as_deref(), &meta, &host)
                .await
        }
        .await;
        match started {
            Ok(g) => Some(g),
            Err(e) => {
                node.shutdown().await;
                return Err(e);
            }
        }
    } else {
        None
    };
    shutdown_signal().await;
    // The gateway first: it detaches its volumes (their leases go back to the metadata
    // service) while this node still answers its clients' last requests.
    if let Some(g) = gateway {
        g.stop().await;
    }
    node.shutdown().await;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

async fn meta_command(cmd: MetaCommand, addrs: &[String], out: &Printer) -> anyhow::Result<()> {
    let client = MetaClient::new(addrs)?;
    match cmd {
        MetaCommand::Run(_) => unreachable!("handled by run"),
        MetaCommand::AddMember { id, addr } => {
            let r = client
                .call(|mut c| {
                    let addr = addr.clone();
                    async move { c.add_member(pb::AddMemberRequest { id, addr }).await }
                })
                .await?;
            out.members(&r.members)
        }
        MetaCommand::RemoveMember { id } => {
            let r = client
                .call(|mut c| async move { c.remove_member(pb::RemoveMemberRequest { id }).await })
                .await?;
            out.members(&r.members)
        }
        MetaCommand::Members => {
            // Ask each member itself, so a member that is down or behind shows as such.
            let mut rows = Vec::new();
            for addr in addrs {
                let status = async {
                    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                        .connect_timeout(std::time::Duration::from_secs(1))
                        .timeout(std::time::Duration::from_secs(3))
                        .connect()
                        .await?;
                    let r = MetadataClient::new(ch)
                        .member_status(pb::MemberStatusRequest {})
                        .await?;
                    anyhow::Ok(r.into_inner())
                }
                .await;
                rows.push((addr.clone(), status.map_err(|e| output::error_line(&e))));
            }
            out.member_statuses(&rows)
        }
    }
}

async fn volume(cmd: VolumeCommand, client: &MetaClient, out: &Printer) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            pool,
        } => {
            let size_bytes = parse_size(&size).map_err(anyhow::Error::msg)?;
            // One id for every retry of this create, so a create that committed before its reply
            // was lost is not reported as "already exists".
            let request_id = format!("cli-{:032x}", rand::random::<u128>());
            let req = pb::CreateVolumeRequest {
                name,
                size_bytes,
                pool: pool.unwrap_or_default(),
                replicas: replicas.unwrap_or(0),
                request_id,
            };
            let r = client.call(|mut c| {
                let req = req.clone();
                async move { c.create_volume(req).await }
            });
            out.volume(r.await?.volume.as_ref().context("reply without a volume")?)
        }
        VolumeCommand::List => {
            let r = client
                .call(|mut c| async move { c.list_volumes(pb::ListVolumesRequest {}).await })
                .await?;
            out.volumes(&r.volumes)
        }
        VolumeCommand::Info { name } => {
            let r = client
                .call(|mut c| {
                    let volume = name.clone();
                    async move { c.get_layout(pb::GetLayoutRequest { volume }).await }
                })
                .await?;
            out.layout(&r)
        }
        VolumeCommand::Resize { name, size } => {
            let new_size_bytes = parse_size(&size).map_err(anyhow::Error::msg)?;
            let r = client
                .call(|mut c| {
                    let name = name.clone();
                    async move {
                        c.resize_volume(pb::ResizeVolumeRequest {
                            name,
                            new_size_bytes,
                        })
                        .await
                    }
                })
                .await?;
            out.volume(r.volume.as_ref().context("reply without a volume")?)
        }
        VolumeCommand::Delete { name } => {
            client
                .call(|mut c| {
                    let name = name.clone();
                    async move { c.delete_volume(pb::DeleteVolumeRequest { name }).await }
                })
                .await?;
            out.done(&format!("deleted volume {name}"))
        }
        VolumeCommand::Attach {
            name,
            holder,
            force,
        } => {
            let r = client
                .call(|mut c| {
                    let (volume, holder) = (name.clone(), holder.clone());
                    async move {
                        c.attach(pb::AttachRequest {
                            volume,
                            holder,
                            force,
                        })
                        .await
                    }
                })
                .await?;
            out.volume(r.volume.as_ref().context("reply without a volume")?)
        }
        VolumeCommand::Detach {
            name,
            holder,
            generation,
        } => {
            client
                .call(|mut c| {
                    let (volume, holder) = (name.clone(), holder.clone());
                    async move {
                        c.release(pb::ReleaseRequest {
                            volume,
                            holder,
                            generation,
                        })
                        .await
                    }
                })
                .await?;
            out.done(&format!("detached volume {name}"))
        }
    }
}
