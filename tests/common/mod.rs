//! Test harness: metadata clusters of real `cairn meta run` processes on 127.0.0.1.

#![allow(dead_code)]

pub mod proxy;
pub mod writer;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_client::MetaClient;
use cairn_proto::metadata as pb;
use cairn_proto::metadata::metadata_client::MetadataClient;

pub const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");

/// Free TCP ports on 127.0.0.1 (bound, then released: the window for a clash is small).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub struct Member {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub extra: Vec<String>,
}

pub struct MetaCluster {
    pub tmp: tempfile::TempDir,
    pub members: BTreeMap<u64, Member>,
    pub peers: String,
}

impl MetaCluster {
    /// Starts `n` members; `extra` flags go to every `cairn meta run`.
    pub fn start(n: u64, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports(usize::try_from(n).unwrap());
        let peers: Vec<String> = (1..=n)
            .map(|i| format!("{i}=127.0.0.1:{}", ports[(i - 1) as usize]))
            .collect();
        let mut c = MetaCluster {
            members: BTreeMap::new(),
            peers: peers.join(","),
            tmp,
        };
        for i in 1..=n {
            let m = Member {
                id: i,
                addr: format!("127.0.0.1:{}", ports[(i - 1) as usize]),
                dir: c.tmp.path().join(format!("meta-{i}")),
                child: None,
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            c.members.insert(i, m);
            c.spawn(i, false, &[]);
        }
        c
    }

    pub fn addrs(&self) -> Vec<String> {
        self.members.values().map(|m| m.addr.clone()).collect()
    }

    /// Starts member `id` (again). `join`: as a member joining an existing cluster.
    pub fn spawn(&mut self, id: u64, join: bool, env: &[(&str, &str)]) {
        let peers = self.peers.clone();
        let m = self.members.get_mut(&id).unwrap();
        assert!(m.child.is_none(), "member {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{}.log", m.dir.display()))
            .unwrap();
        let mut cmd = Command::new(CAIRN);
        cmd.args([
            "meta",
            "run",
            "--id",
            &id.to_string(),
            "--listen",
            &m.addr,
            "--data-dir",
        ])
        .arg(&m.dir)
        .args(["--peers", &peers])
        .args(&m.extra)
        .env("CAIRN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        if join {
            cmd.arg("--join");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        m.child = Some(cmd.spawn().expect("spawning cairn meta run"));
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        let m = self.members.get_mut(&id).unwrap();
        if let Some(mut c) = m.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self, id: u64) {
        let m = self.members.get_mut(&id).unwrap();
        if let Some(mut c) = m.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "member {id} did not stop on SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits for member `id`'s process to exit on its own (a failpoint crash); returns whether
    /// it did within `timeout`.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> bool {
        let m = self.members.get_mut(&id).unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = m.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    m.child = None;
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn wipe(&mut self, id: u64) {
        let m = &self.members[&id];
        assert!(m.child.is_none());
        std::fs::remove_dir_all(&m.dir).unwrap();
    }

    pub fn client(&self) -> MetaClient {
        MetaClient::new(&self.addrs())
            .unwrap()
            .with_deadline(Duration::from_secs(30))
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(format!("{}.log", self.members[&id].dir.display()))
            .unwrap_or_default()
    }

    /// Each member's own status, `None` where it does not answer.
    pub async fn statuses(&self) -> BTreeMap<u64, Option<pb::MemberStatusResponse>> {
        let mut out = BTreeMap::new();
        for (id, m) in &self.members {
            out.insert(*id, member_status(&m.addr).await);
        }
        out
    }

    /// Waits until some member reports itself leader; returns its id.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            for (id, s) in self.statuses().await {
                if s.is_some_and(|s| s.role == "leader") {
                    return id;
                }
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running member has applied the same index with the same digest.
    pub async fn converged(&self, timeout: Duration) -> pb::MemberStatusResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<u64> = self
                .members
                .values()
                .filter(|m| m.child.is_some())
                .map(|m| m.id)
                .collect();
            let st = self.statuses().await;
            let answers: Vec<&pb::MemberStatusResponse> =
                running.iter().filter_map(|id| st[id].as_ref()).collect();
            if answers.len() == running.len()
                && answers.windows(2).all(|w| {
                    w[0].applied_index == w[1].applied_index
                        && w[0].state_digest == w[1].state_digest
                })
                && answers
                    .first()
                    .is_some_and(|a| a.applied_index == a.commit_index)
            {
                return answers[0].clone();
            }
            if Instant::now() >= deadline {
                let silent: String = st
                    .iter()
                    .filter(|(id, s)| s.is_none() && running.contains(id))
                    .map(|(id, _)| {
                        let log = self.log(*id);
                        let tail: Vec<&str> = log.lines().rev().take(40).collect();
                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                        format!("--- member {id} log tail ---\n{}\n", tail.join("\n"))
                    })
                    .collect();
                panic!("members did not converge: {st:#?}\n{silent}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for MetaCluster {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub async fn member_status(addr: &str) -> Option<pb::MemberStatusResponse> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    MetadataClient::new(ch)
        .member_status(pb::MemberStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Creates a volume through the leader-following client, retrying with the same request id
/// until the outcome is known. `Ok(true)`: acknowledged.
pub async fn create_volume(
    c: &MetaClient,
    name: &str,
    request_id: &str,
) -> Result<pb::Volume, cairn_client::MetaClientError> {
    let req = pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: 1 << 30,
        pool: String::new(),
        replicas: 0,
        request_id: request_id.into(),
    };
    c.call(|mut cl| {
        let req = req.clone();
        async move { cl.create_volume(req).await }
    })
    .await
    .map(|r| r.volume.expect("create answers with the volume"))
}

pub async fn list_names(c: &MetaClient) -> Vec<String> {
    let r = c
        .call(|mut cl| async move { cl.list_volumes(pb::ListVolumesRequest {}).await })
        .await
        .unwrap();
    r.volumes.into_iter().map(|v| v.name).collect()
}

/// Adds a metadata member through the leader.
pub async fn add_member(c: &MetaClient, id: u64, addr: &str) -> Vec<pb::Member> {
    c.call(|mut cl| {
        let addr = addr.to_owned();
        async move { cl.add_member(pb::AddMemberRequest { id, addr }).await }
    })
    .await
    .unwrap()
    .members
}

/// Removes a metadata member through the leader.
pub async fn remove_member(c: &MetaClient, id: u64) {
    c.call(|mut cl| async move { cl.remove_member(pb::RemoveMemberRequest { id }).await })
        .await
        .unwrap();
}

/// A `--base-port` for `cairn up`: below the ephemeral range (32768+), so no outgoing
/// connection of a concurrently running test can hold one of its ports, and with every port
/// `cairn up` uses (base+1..=base+19) checked free just before. `attempt` moves the pick.
pub fn up_base_port(attempt: u64) -> u16 {
    for retry in 0..64u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(0);
        let seed = u64::from(std::process::id()) * 7919 + (attempt * 64 + retry) * 104_729 + nanos;
        let base = 20_000 + u16::try_from(seed % 900).unwrap() * 10;
        if (base + 1..=base + 19).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range for cairn up in 20000..29000");
}

/// A whole local cluster as users run it: `cairn up` (1 metadata member, 3 storage nodes,
/// the NBD gateway, by default inside node 1) on free ports in a temp dir. Stopped with
/// SIGTERM on drop.
pub struct UpCluster {
    pub tmp: tempfile::TempDir,
    pub up: Child,
    pub meta: String,
    pub nbd: String,
    base: u16,
    extra: Vec<String>,
}

impl UpCluster {
    /// Starts the cluster on ports below the ephemeral range (so no outgoing connection holds
    /// one of them), checked free just before; tries another range if it does not come up.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more `cairn up` flags (kept for [`restart`](Self::restart)).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut why = String::new();
        for attempt in 0..4u64 {
            match Self::try_start(up_base_port(attempt), extra) {
                Ok(c) => return c,
                Err(e) => why = e,
            }
        }
        panic!("cairn up did not come up: {why}");
    }

    fn try_start(base: u16, extra: &[&str]) -> Result<Self, String> {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let up = Self::launch(tmp.path(), base, &extra)?;
        let metas = extra
            .iter()
            .position(|a| a == "--meta-replicas")
            .and_then(|i| extra.get(i + 1))
            .map_or(1, |n| n.parse::<u16>().unwrap());
        Ok(Self {
            meta: (1..=metas)
                .map(|i| format!("127.0.0.1:{}", base + i))
                .collect::<Vec<_>>()
                .join(","),
            nbd: format!("127.0.0.1:{}", base + 9),
            base,
            extra,
            tmp,
            up,
        })
    }

    /// The metadata members' addresses.
    pub fn meta_addrs(&self) -> Vec<String> {
        self.meta.split(',').map(str::to_owned).collect()
    }

    /// Runs `cairn up` in `dir` and waits for "cairn is up".
    fn launch(dir: &std::path::Path, base: u16, extra: &[String]) -> Result<Child, String> {
        let nbd = format!("127.0.0.1:{}", base + 9);
        let log = std::fs::File::create(dir.join("up.stderr")).unwrap();
        let mut up = Command::new(CAIRN)
            .args([
                "up",
                "--base-port",
                &base.to_string(),
                "--nbd-listen",
                &nbd,
                "--disk-size",
                "2G",
            ])
            .args(extra)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(up.stdout.take().unwrap());
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut out, &mut line);
        if !line.starts_with("cairn is up") {
            let _ = up.kill();
            let _ = up.wait();
            let err = std::fs::read_to_string(dir.join("up.stderr")).unwrap_or_default();
            let logs = std::fs::read_dir(dir.join("cairn-data/logs"))
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                            let tail: Vec<&str> = t.lines().rev().take(5).collect();
                            format!("{}: {:?}", e.path().display(), tail)
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            return Err(format!("stdout {line:?}, stderr {err:?}\n{logs}"));
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Ok(up)
    }

    /// Power loss: SIGKILL to `cairn up` and every process of the cluster at once.
    pub fn kill_everything(&mut self) {
        let file = self.cluster_file();
        let mut pids = vec![i32::try_from(self.up.id()).unwrap()];
        for p in file["processes"].as_array().unwrap() {
            if let Some(pid) = p["pid"].as_u64() {
                pids.push(i32::try_from(pid).unwrap());
            }
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.up.wait();
    }

    /// Starts the same cluster again, from its data directory.
    pub fn restart(&mut self) {
        self.up =
            Self::launch(self.tmp.path(), self.base, &self.extra).expect("cairn up came back");
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// Runs `cairn` against this cluster; panics with its stderr if it fails.
    pub fn cairn(&self, args: &[&str]) -> std::process::Output {
        let o = Command::new(CAIRN)
            .arg("--meta")
            .arg(&self.meta)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "cairn {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    pub fn cluster_file(&self) -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.tmp.path().join("cairn-data/cluster.json")).unwrap(),
        )
        .unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

impl Drop for UpCluster {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.up.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.up.wait();
    }
}

/// Runs an external tool, failing loudly if it is missing (scripts/setup installs it).
pub fn run_tool(tool: &str, args: &[&str]) -> std::process::Output {
    let o = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed by this test ({e}); run scripts/setup"));
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A 4 KiB block whose bytes depend on its offset and a version (xorshift): every version of
/// every block differs.
pub fn versioned_block(offset: u64, v: u64) -> bytes::Bytes {
    let mut x = offset ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    bytes::Bytes::from(
        (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

/// A process a test started, killed when the test ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl UpCluster {
    /// The cluster.json entry of a process (`role` "meta", "node" or "nbd").
    pub fn process(&self, role: &str, id: u64) -> serde_json::Value {
        self.cluster_file()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["role"] == role && p["id"] == id)
            .unwrap_or_else(|| panic!("no {role} {id} in cluster.json"))
            .clone()
    }

    /// SIGKILL to a process `cairn up` started.
    pub fn kill(&self, role: &str, id: u64) {
        let pid = self.process(role, id)["pid"].as_u64().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    /// Starts a process again with the command `cairn up` recorded (and `env`), logging to
    /// the same file.
    pub fn respawn(&self, role: &str, id: u64, env: &[(&str, &str)]) -> KillOnDrop {
        self.respawn_with(role, id, env, &[])
    }

    /// [`respawn`](Self::respawn) with flags changed: each `(flag, value)` replaces the
    /// recorded value of `flag`, or is added.
    pub fn respawn_with(
        &self,
        role: &str,
        id: u64,
        env: &[(&str, &str)],
        flags: &[(&str, &str)],
    ) -> KillOnDrop {
        let e = self.process(role, id);
        let mut cmd: Vec<String> = e["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        for (flag, value) in flags {
            match cmd.iter().position(|a| a == flag) {
                Some(i) => cmd[i + 1] = value.to_string(),
                None => cmd.extend([flag.to_string(), value.to_string()]),
            }
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(e["log"].as_str().unwrap())
            .unwrap();
        KillOnDrop(
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// The process serving NBD, as (role, id): the gateway process (`--gateway separate`),
    /// else storage node 1, which runs it (`cairn up`'s default).
    pub fn gateway(&self) -> (&'static str, u64) {
        let file = self.cluster_file();
        match file["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["role"] == "nbd")
        {
            true => ("nbd", 1),
            false => ("node", 1),
        }
    }

    /// Starts the NBD gateway again (after a kill: with the default layout, storage node 1
    /// with it) and waits until it accepts connections.
    pub fn respawn_gateway(&self) -> KillOnDrop {
        let (role, id) = self.gateway();
        let gateway = self.respawn(role, id, &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.nbd).is_err() {
            assert!(Instant::now() < deadline, "gateway did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
        gateway
    }

    /// The placement group of a volume's first segment, as the metadata service has it now.
    pub async fn first_group(&self, volume: &str) -> pb::PlacementGroup {
        let mc = MetaClient::new(&self.meta_addrs()).unwrap();
        let volume = volume.to_owned();
        mc.call(|mut c| {
            let volume = volume.clone();
            async move { c.get_layout(pb::GetLayoutRequest { volume }).await }
        })
        .await
        .unwrap()
        .segments[0]
            .group
            .clone()
            .unwrap()
    }
}

/// Finds `needle` (one 4 KiB block) in a node's disk file, past its log region, once the
/// node's in-place copy has landed; returns its byte offset.
pub fn find_block(disk: &std::path::Path, needle: &[u8]) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    // 2 GiB disks: superblock area 1 MiB, then a 16 MiB log, then the chunk slots.
    const DATA: u64 = 17 << 20;
    for _ in 0..100 {
        let mut f = std::fs::File::open(disk).unwrap();
        f.seek(SeekFrom::Start(DATA)).unwrap();
        let mut buf = vec![0u8; 64 << 20];
        f.read_exact(&mut buf).unwrap();
        if let Some(i) = buf.chunks(4096).position(|b| b == needle) {
            return DATA + i as u64 * 4096;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("block not found in {}", disk.display());
}

/// Flips one byte of a node's copy of `block` in its disk file, behind the node's back.
pub fn corrupt_block(disk: &std::path::Path, block: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let at = find_block(disk, block);
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(at + 100)).unwrap();
    f.write_all(&[block[100] ^ 0xFF]).unwrap();
    f.sync_all().unwrap();
}

/// Reads `len` bytes at `offset` of chunk `chunk` straight from one group member, as a client
/// holding `generation` would, without attaching (an attach would reconcile chunks first).
pub async fn read_member(
    volume: u64,
    generation: u64,
    g: &pb::PlacementGroup,
    m: &pb::GroupMember,
    chunk: u64,
    offset: u64,
    len: u64,
) -> Result<bytes::Bytes, String> {
    use cairn_proto::data as dpb;
    let req = dpb::Request {
        op: dpb::Op::Read as i32,
        volume,
        chunk,
        offset,
        length: len,
        generation,
        group: g.id,
        epoch: g.epoch,
        disk: m.disk_uuid.clone(),
        ..Default::default()
    };
    let c = cairn_client::data::client::DataClient::connect(&m.data_addr)
        .await
        .map_err(|e| e.to_string())?;
    let (r, data) = c
        .call(req, bytes::Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    if r.status != dpb::Status::Ok as i32 {
        return Err(format!("{}: {r:?}", m.host));
    }
    Ok(data)
}
