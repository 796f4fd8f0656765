//! `cairn up`: a local cluster as separate processes under one data directory.
//!
//! It starts the metadata member(s), the storage nodes and an NBD gateway (TCP and a unix
//! socket in the data directory) — inside storage node 1, or with `--gateway separate` as a
//! process of its own —
//! writes `<data-dir>/cluster.json` listing each process with the exact command that restarts
//! it, stays in the foreground, and stops everything cleanly on Ctrl-C or SIGTERM. Run again on
//! the same data directory, it brings back the same cluster, ports and data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_client::MetaClient;
use cairn_proto::metadata as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::args::{Gateway, UpArgs};

/// One process of the local cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessEntry {
    /// "meta", "node" or "nbd".
    pub role: String,
    pub id: u64,
    pub addr: String,
    /// Set while `cairn up` runs the process; null once it has stopped.
    pub pid: Option<u32>,
    /// The exact command line that (re)starts this process.
    pub command: Vec<String>,
    pub log: PathBuf,
}

/// `<data-dir>/cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterFile {
    pub data_dir: PathBuf,
    pub processes: Vec<ProcessEntry>,
}

impl ClusterFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid cluster file", path.display()))
    }

    /// Writes the file atomically (temporary file, then rename), so a reader never sees half.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Where the cluster's NBD gateway listens on TCP: the gateway process's address, or the
    /// `--nbd-listen` of the storage node that runs it.
    pub fn nbd_addr(&self) -> Option<String> {
        self.processes.iter().find_map(|p| match p.role.as_str() {
            "nbd" => Some(p.addr.clone()),
            _ => p
                .command
                .iter()
                .position(|c| c == "--nbd-listen")
                .and_then(|i| p.command.get(i + 1).cloned()),
        })
    }

    pub fn meta_addrs(&self) -> Vec<String> {
        self.processes
            .iter()
            .filter(|p| p.role == "meta")
            .map(|p| p.addr.clone())
            .collect()
    }
}

/// Whether the process recorded as `p` still runs: its pid exists, is not a zombie (an
/// unreaped corpse after a kill), and runs the recorded command (after a reboot the pid may
/// belong to anything).
fn alive(p: &ProcessEntry) -> bool {
    let Some(pid) = p.pid.and_then(|pid| i32::try_from(pid).ok()) else {
        return false;
    };
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let zombie = std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    let same = std::fs::read(proc_dir.join("cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            args.len() == p.command.len()
                && args
                    .iter()
                    .zip(&p.command)
                    .skip(1)
                    .all(|(a, b)| *a == b.as_bytes())
        })
        .unwrap_or(true);
    !zombie && same
}

fn plan(a: &UpArgs, data_dir: &Path, exe: &Path) -> anyhow::Result<ClusterFile> {
    let path = data_dir.join("cluster.json");
    if path.exists() {
        let old = ClusterFile::load(&path)?;
        if let Some(p) = old.processes.iter().find(|p| alive(p)) {
            bail!(
                "a cluster is already running from {} ({} {} has pid {}); stop it first",
                data_dir.display(),
                p.role,
                p.id,
                p.pid.unwrap_or(0)
            );
        }
        let metas = old.processes.iter().filter(|p| p.role == "meta").count() as u64;
        if let Some(asked) = a.meta_replicas.filter(|&n| n != metas) {
            bail!(
                "{} holds a cluster with {metas} metadata member(s); --meta-replicas {asked} cannot \
                 change it (use `cairn meta add-member` / `remove-member`)",
                data_dir.display(),
            );
        }
        // Same processes, same ports, same data (and a gateway, if the cluster predates it).
        let gateway = old.nbd_addr().is_some();
        let mut processes = old.processes;
        if !gateway {
            let metas = old_meta_addrs(&processes);
            processes.push(nbd_entry(a, data_dir, exe, &metas));
        }
        return Ok(ClusterFile { processes, ..old });
    }
    let n = a.meta_replicas.unwrap_or(1);
    let addrs: Vec<(u64, String)> = (1..=n)
        .map(|i| {
            let port = u64::from(a.base_port) + i;
            anyhow::ensure!(
                port <= 65535,
                "--base-port {} leaves no room for {n} members",
                a.base_port
            );
            Ok((i, format!("127.0.0.1:{port}")))
        })
        .collect::<anyhow::Result<_>>()?;
    let peers = addrs
        .iter()
        .map(|(i, a)| format!("{i}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    let processes: Vec<ProcessEntry> = addrs
        .iter()
        .map(|(i, addr)| ProcessEntry {
            role: "meta".into(),
            id: *i,
            addr: addr.clone(),
            pid: None,
            command: vec![
                exe.display().to_string(),
                "meta".into(),
                "run".into(),
                "--id".into(),
                i.to_string(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                data_dir.join(format!("meta-{i}")).display().to_string(),
                "--peers".into(),
                peers.clone(),
            ]
            .into_iter()
            .chain(
                a.replace_after_ms
                    .map(|ms| vec!["--replace-after-ms".into(), ms.to_string()])
                    .unwrap_or_default(),
            )
            .collect(),
            log: data_dir.join("logs").join(format!("meta-{i}.log")),
        })
        .collect();
    let mut processes: Vec<ProcessEntry> = processes;
    let disk_size = cairn_proto::parse_size(&a.disk_size).map_err(anyhow::Error::msg)?;
    let metas = addrs
        .iter()
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let in_node = a.gateway == Gateway::InNode;
    for i in 1..=a.nodes.unwrap_or(3) {
        let port = u64::from(a.base_port) + 10 + i;
        anyhow::ensure!(
            port <= 65535,
            "--base-port {} leaves no room for the nodes",
            a.base_port
        );
        let addr = format!("127.0.0.1:{port}");
        let dir = data_dir.join(format!("node-{i}"));
        processes.push(ProcessEntry {
            role: "node".into(),
            id: i,
            addr: addr.clone(),
            pid: None,
            command: vec![
                exe.display().to_string(),
                "--meta".into(),
                metas.clone(),
                "node".into(),
                "run".into(),
                "--data-dir".into(),
                dir.display().to_string(),
                "--listen".into(),
                addr,
                "--disk".into(),
                format!("{}:{disk_size}", dir.join("disk0.img").display()),
                // Each local node stands for a host of its own, so groups span three of them.
                "--host".into(),
                format!("node-{i}"),
            ]
            .into_iter()
            .chain(
                (in_node && i == 1)
                    .then(|| {
                        [
                            "--nbd-listen".into(),
                            a.nbd_listen.to_string(),
                            "--nbd-socket".into(),
                            data_dir.join("nbd.sock").display().to_string(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .chain(a.node_args.iter().cloned())
            .collect(),
            log: data_dir.join("logs").join(format!("node-{i}.log")),
        });
    }
    if !in_node {
        processes.push(nbd_entry(a, data_dir, exe, &metas));
    }
    Ok(ClusterFile {
        data_dir: data_dir.to_owned(),
        processes,
    })
}

fn old_meta_addrs(processes: &[ProcessEntry]) -> String {
    processes
        .iter()
        .filter(|p| p.role == "meta")
        .map(|p| p.addr.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The NBD gateway: on `--nbd-listen` and on `<data-dir>/nbd.sock`.
fn nbd_entry(a: &UpArgs, data_dir: &Path, exe: &Path, metas: &str) -> ProcessEntry {
    ProcessEntry {
        role: "nbd".into(),
        id: 1,
        addr: a.nbd_listen.to_string(),
        pid: None,
        command: vec![
            exe.display().to_string(),
            "--meta".into(),
            metas.to_owned(),
            "nbd".into(),
            "serve".into(),
            "--listen".into(),
            a.nbd_listen.to_string(),
            "--socket".into(),
            data_dir.join("nbd.sock").display().to_string(),
            "--host".into(),
            "node-1".into(),
        ],
        log: data_dir.join("logs").join("nbd-1.log"),
    }
}

fn spawn(p: &ProcessEntry) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .with_context(|| format!("opening {}", p.log.display()))?;
    let mut cmd = Command::new(&p.command[0]);
    cmd.args(&p.command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a terminal's Ctrl-C reaches `cairn up` only, which then stops
        // the cluster in order.
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn()
        .with_context(|| format!("starting {} {}", p.role, p.id))
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(a.data_dir.join("logs"))
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let data_dir = a.data_dir.canonicalize()?;
    let exe = std::env::current_exe().context("locating the cairn binary")?;
    let mut file = plan(&a, &data_dir, &exe)?;
    let path = data_dir.join("cluster.json");
    let mut children = Vec::new();
    for p in &mut file.processes {
        let child = spawn(p)?;
        p.pid = child.id();
        children.push(Some(child));
    }
    file.save(&path)?;

    let client = MetaClient::new(&file.meta_addrs())?.with_deadline(Duration::from_secs(30));
    let nodes = file.processes.iter().filter(|p| p.role == "node").count();
    let ready = wait_ready(&client, nodes, &file, &mut children).await;
    match ready {
        Ok(s) => {
            let meta = file.meta_addrs().join(",");
            println!(
                "cairn is up: {} metadata member(s) at {meta}, leader {}; {} storage node(s) up",
                s.members.len(),
                s.leader_id,
                s.nodes.iter().filter(|n| n.up).count()
            );
            if let Some(addr) = file.nbd_addr() {
                println!(
                    "  nbd:     nbd://{addr}/<volume>  and  nbd+unix:///<volume>?socket={}",
                    data_dir.join("nbd.sock").display()
                );
            }
            println!("  data:    {}", data_dir.display());
            println!("  cluster: {}", path.display());
            println!("  try:     cairn --meta {meta} volume create vm1 --size 10G");
            println!("Ctrl-C stops the cluster.");
        }
        Err(e) => {
            stop(&mut file, &mut children, &path).await?;
            bail!(
                "the cluster did not come up: {e:#}; see the logs in {}",
                data_dir.join("logs").display()
            );
        }
    }

    let mut signal = Box::pin(crate::commands::shutdown_signal());
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let mut changed = false;
                for (p, c) in file.processes.iter_mut().zip(children.iter_mut()) {
                    if let Some(child) = c {
                        if let Ok(Some(status)) = child.try_wait() {
                            eprintln!("warning: {} {} exited ({status}); see {}", p.role, p.id, p.log.display());
                            *c = None;
                            p.pid = None;
                            changed = true;
                        }
                    }
                }
                if changed {
                    file_changed(&file, &path);
                }
            }
        }
    }
    stop(&mut file, &mut children, &path).await?;
    println!(
        "cairn stopped; run `cairn up --data-dir {}` to bring it back",
        data_dir.display()
    );
    Ok(())
}

/// Waits until the metadata service answers, `nodes` storage nodes have registered and are
/// up, and the NBD gateway accepts connections. Fails at once if one of the processes exits
/// meanwhile (a port already taken, a bad disk path), and after 60 s if the cluster still is
/// not all up: "cairn is up" is only ever printed for the whole cluster.
async fn wait_ready(
    client: &MetaClient,
    nodes: usize,
    file: &ClusterFile,
    children: &mut [Option<Child>],
) -> anyhow::Result<pb::ClusterStatusResponse> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (p, c) in file.processes.iter().zip(children.iter_mut()) {
            if let Some(Ok(Some(status))) = c.as_mut().map(Child::try_wait) {
                bail!(
                    "{} {} exited ({status}); its log: {}",
                    p.role,
                    p.id,
                    p.log.display()
                );
            }
        }
        let s = client
            .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
            .await?;
        let up = s.nodes.iter().filter(|n| n.up).count();
        // The gateway too: one inside a storage node listens once that node serves.
        let gateway = match file.nbd_addr() {
            Some(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
            None => true,
        };
        let serves = up >= nodes && serving(&s).await;
        if serves && gateway {
            return Ok(s);
        }
        if tokio::time::Instant::now() >= deadline {
            match (up >= nodes, serves) {
                (false, _) => bail!("only {up} of {nodes} storage nodes registered within 60 s"),
                (true, false) => bail!("the storage nodes did not serve requests within 60 s"),
                (true, true) => bail!("the NBD gateway did not accept connections within 60 s"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether every node answers a request (a flush): a node heard by the metadata service may
/// not have read the heartbeat's answer yet, and until then it serves nothing.
async fn serving(s: &pb::ClusterStatusResponse) -> bool {
    for n in &s.nodes {
        let Ok(c) = cairn_client::data::client::DataClient::connect(&n.data_addr).await else {
            return false;
        };
        let req = cairn_proto::data::Request {
            op: cairn_proto::data::Op::Flush as i32,
            ..Default::default()
        };
        match c.call(req, bytes::Bytes::new()).await {
            Ok((r, _)) if r.status == cairn_proto::data::Status::Ok as i32 => {}
            _ => return false,
        }
    }
    true
}

fn file_changed(file: &ClusterFile, path: &Path) {
    if let Err(e) = file.save(path) {
        eprintln!("warning: cannot update {}: {e:#}", path.display());
    }
}

/// SIGTERM to every process (clean shutdown), SIGKILL to any still running after 10 s.
async fn stop(
    file: &mut ClusterFile,
    children: &mut [Option<Child>],
    path: &Path,
) -> anyhow::Result<()> {
    for c in children.iter().flatten() {
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    for c in children.iter_mut().flatten() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
    for p in &mut file.processes {
        p.pid = None;
    }
    file.save(path)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn up_args(extra: &[&str]) -> UpArgs {
        let cli = Cli::parse_from(
            ["cairn", "up", "--nbd-listen", "127.0.0.1:10999"]
                .into_iter()
                .chain(extra.iter().copied()),
        );
        match cli.command {
            Command::Up(a) => a,
            _ => unreachable!("parsed `cairn up`"),
        }
    }

    /// By default storage node 1 runs the gateway (on the TCP address and the data directory's
    /// socket) and there is no gateway process; `--gateway separate` gives it a process of its
    /// own. Either way the cluster file says where NBD is served, and a cluster planned again
    /// from its file keeps its layout (no second gateway).
    #[test]
    fn the_gateway_runs_in_node_1_unless_asked_apart() {
        let dir = tempfile::tempdir().unwrap();
        let exe = Path::new("/usr/bin/cairn");
        let serves_nbd = |p: &ProcessEntry| p.command.iter().any(|c| c == "--nbd-listen");

        let f = plan(&up_args(&[]), dir.path(), exe).unwrap();
        assert!(f.processes.iter().all(|p| p.role != "nbd"));
        let gateways: Vec<(&str, u64)> = f
            .processes
            .iter()
            .filter(|p| serves_nbd(p))
            .map(|p| (p.role.as_str(), p.id))
            .collect();
        assert_eq!(gateways, [("node", 1)]);
        let node1 = &f.processes.iter().find(|p| serves_nbd(p)).unwrap().command;
        let sock = dir.path().join("nbd.sock").display().to_string();
        assert!(node1
            .windows(2)
            .any(|w| w == ["--nbd-socket", sock.as_str()]));
        assert_eq!(f.nbd_addr().as_deref(), Some("127.0.0.1:10999"));

        f.save(&dir.path().join("cluster.json")).unwrap();
        let again = plan(&up_args(&[]), dir.path(), exe).unwrap();
        assert_eq!(
            again.processes, f.processes,
            "the same cluster, no second gateway"
        );

        let apart = tempfile::tempdir().unwrap();
        let f = plan(&up_args(&["--gateway", "separate"]), apart.path(), exe).unwrap();
        assert!(f.processes.iter().all(|p| !serves_nbd(p)));
        assert_eq!(f.processes.iter().filter(|p| p.role == "nbd").count(), 1);
        assert_eq!(f.nbd_addr().as_deref(), Some("127.0.0.1:10999"));
    }
}
