//! The thrash test: a verifying writer on a 3-replica volume (4 storage nodes, so a failed
//! disk has somewhere to go) while a chaos driver, with a printed seed, kills and restarts
//! storage nodes and the metadata leader, cuts a node off the network (every node is reached
//! through fault proxies), fails a member's disk (EIO) or slows it down, and finally kills
//! every process at once. No write may fail before the power loss; every acknowledged write
//! (or one in flight over it) reads back at the end, every group is whole again, and the
//! replicas are identical. It prints the faults injected, the longest write, and the bytes
//! resynced against the bytes written while a member was away.
//!
//! CAIRN_THRASH_SECS sets how long the chaos runs (default 90; a soak: thousands);
//! CAIRN_THRASH_SEED replays a run.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use common::proxy::FaultProxy;
use common::{versioned_block as block, KillOnDrop, UpCluster};

const MIB: u64 = 1 << 20;
const NODES: u64 = 4;
const WRITERS: u64 = 4;
const REGION: u64 = 8 * MIB;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Per block: the last acknowledged version, and a version sent after it.
type Truth = Arc<Mutex<HashMap<u64, (u64, Option<u64>)>>>;

struct Chaos<'a> {
    c: &'a UpCluster,
    /// Processes this test started again (killed at the power loss and at the end).
    restarted: HashMap<(String, u64), KillOnDrop>,
    faults: Vec<String>,
    /// Per storage node: the proxies it is reached through (data, then one per metadata
    /// member), and the flags that send it through them.
    links: HashMap<u64, NodeLinks>,
}

/// A storage node's proxies and the `(flag, value)`s that route it through them.
type NodeLinks = (Vec<FaultProxy>, Vec<(String, String)>);

impl Chaos<'_> {
    fn kill(&mut self, role: &str, id: u64) {
        // A process this test started is killed when its guard drops.
        if self.restarted.remove(&(role.to_owned(), id)).is_none() {
            if let Some(pid) = self.c.process(role, id)["pid"].as_u64() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    fn start(&mut self, role: &str, id: u64) {
        self.start_env(role, id, &[]);
    }

    /// Starts a process again with its recorded command (a storage node: through its
    /// proxies) and `env`.
    fn start_env(&mut self, role: &str, id: u64, env: &[(&str, &str)]) {
        let flags: Vec<(&str, &str)> = match (self.links.get(&id), role) {
            (Some((_, f)), "node") => f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            _ => Vec::new(),
        };
        let child = self.c.respawn_with(role, id, env, &flags);
        self.restarted.insert((role.to_owned(), id), child);
    }

    fn status(&self) -> serde_json::Value {
        let o = Command::new(common::CAIRN)
            .args(["--meta", &self.c.meta, "status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    /// Cuts a storage node off the network, or heals it.
    fn cut(&self, node: u64, cut: bool) {
        for p in &self.links[&node].0 {
            if cut {
                p.cut()
            } else {
                p.heal()
            }
        }
    }

    /// The storage nodes holding the volume's group now.
    fn members(&self, rt: &tokio::runtime::Runtime) -> Vec<u64> {
        let g = rt.block_on(self.c.first_group("th"));
        g.members
            .iter()
            .map(|m| m.host.trim_start_matches("node-").parse().unwrap())
            .collect()
    }

    /// Waits until every placement group is whole again.
    fn wait_whole(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status();
            if s["degraded_groups"].as_u64() == Some(0) {
                return;
            }
            assert!(Instant::now() < deadline, "groups not whole again: {s}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[test]
fn thrash() {
    let secs: u64 = std::env::var("CAIRN_THRASH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    let seed: u64 = std::env::var("CAIRN_THRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("thrash: seed {seed} (CAIRN_THRASH_SEED={seed} replays it), {secs} s of chaos");
    let mut rng = Rng(seed);
    let mut c = UpCluster::start_with(&["--meta-replicas", "3", "--nodes", "4"]);
    c.cairn(&["volume", "create", "th", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut chaos = Chaos {
        c: &c,
        restarted: HashMap::new(),
        faults: Vec::new(),
        links: HashMap::new(),
    };
    // Every storage node again, reached through proxies: its data port and its links to the
    // metadata members. Cut off for more than 4 s, it stops serving.
    for node in 1..=NODES {
        let addr = c.process("node", node)["addr"].as_str().unwrap().to_owned();
        let mut proxies = vec![rt.block_on(FaultProxy::start(addr.parse().unwrap()))];
        for m in c.meta_addrs() {
            proxies.push(rt.block_on(FaultProxy::start(m.parse().unwrap())));
        }
        let metas: Vec<String> = proxies[1..].iter().map(|p| p.addr.to_string()).collect();
        let flags = vec![
            ("--advertise".to_owned(), proxies[0].addr.to_string()),
            ("--meta".to_owned(), metas.join(",")),
            ("--fence-after-ms".to_owned(), "4000".to_owned()),
        ];
        chaos.links.insert(node, (proxies, flags));
        chaos.kill("node", node);
        std::thread::sleep(Duration::from_millis(200));
        chaos.start("node", node);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = chaos.status();
        let through = st["nodes"].as_array().is_some_and(|ns| {
            ns.len() as u64 == NODES
                && ns.iter().all(|n| {
                    let host = n["host"].as_str().unwrap_or("");
                    let id: u64 = host.trim_start_matches("node-").parse().unwrap_or(0);
                    chaos.links.get(&id).is_some_and(|(p, _)| {
                        n["data_addr"] == p[0].addr.to_string().as_str() && n["up"] == true
                    })
                })
        });
        if through {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes not up behind proxies: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let metas = c.meta_addrs();
    let attach = |force: bool| {
        let metas = metas.clone();
        async move {
            VolumeClient::attach(
                MetaClient::new(&metas).unwrap(),
                "th",
                AttachOptions {
                    holder: "thrash".into(),
                    force,
                    host: "node-1".into(),
                },
            )
            .await
        }
    };
    let vc = rt.block_on(attach(false)).unwrap();

    let truth: Truth = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let longest_us = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (vc, truth, stop, failures, longest_us, written) = (
            vc.clone(),
            truth.clone(),
            stop.clone(),
            failures.clone(),
            longest_us.clone(),
            written.clone(),
        );
        let mut r = Rng(seed ^ ((w + 1) * 0x51_7CC1_B727_220A));
        writers.push(rt.spawn(async move {
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                let off = w * REGION + (r.next() % (REGION / 4096)) * 4096;
                if r.next().is_multiple_of(4) {
                    // A verifying read of an acknowledged block (none of this writer's own
                    // writes to it is in flight: writers are sequential).
                    let want = truth.lock().unwrap().get(&off).map(|t| t.0);
                    if let Some(want) = want {
                        match vc.read(off, 4096).await {
                            Ok(d) if d == block(off, want) => {}
                            Ok(_) => failures
                                .lock()
                                .unwrap()
                                .push(format!("block {off}: wrong data (want version {want})")),
                            Err(e) => failures.lock().unwrap().push(format!("read {off}: {e}")),
                        }
                    }
                    continue;
                }
                truth.lock().unwrap().entry(off).or_insert((0, None)).1 = Some(v);
                let t = Instant::now();
                match vc.write(off, block(off, v)).await {
                    Ok(()) => {
                        longest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                        truth.lock().unwrap().insert(off, (v, None));
                        written.fetch_add(4096, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("write {off}: {e}"));
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                v += 1;
            }
        }));
    }

    let mut away_bytes = 0u64;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500 + rng.next() % 1500));
        match rng.next() % 9 {
            0..=1 => {
                // The metadata leader, killed and started again.
                let leader = chaos.status()["leader_id"].as_u64().unwrap_or(1);
                chaos.faults.push(format!("kill metadata leader {leader}"));
                chaos.kill("meta", leader);
                std::thread::sleep(Duration::from_millis(1000 + rng.next() % 2000));
                chaos.start("meta", leader);
            }
            2..=4 => {
                // A storage node, down for a while, then back; the next fault waits for it
                // to rejoin (two members out would leave fewer than min_replicas).
                let node = 1 + rng.next() % NODES;
                chaos.faults.push(format!("kill storage node {node}"));
                let before = written.load(Ordering::Relaxed);
                chaos.kill("node", node);
                std::thread::sleep(Duration::from_millis(1000 + rng.next() % 3000));
                away_bytes += written.load(Ordering::Relaxed) - before;
                chaos.start("node", node);
                chaos.wait_whole(Duration::from_secs(90));
            }
            5..=6 => {
                // A member cut off the network (silent: no resets), then healed.
                let ms = chaos.members(&rt);
                let node = ms[(rng.next() % ms.len() as u64) as usize];
                let cut_ms = 1000 + rng.next() % 7000;
                chaos
                    .faults
                    .push(format!("partition storage node {node} for {cut_ms} ms"));
                let before = written.load(Ordering::Relaxed);
                chaos.cut(node, true);
                std::thread::sleep(Duration::from_millis(cut_ms));
                away_bytes += written.load(Ordering::Relaxed) - before;
                chaos.cut(node, false);
                chaos.wait_whole(Duration::from_secs(90));
            }
            7 => {
                // A member's disk starts failing writes (EIO): it is isolated and the group
                // gets a new member on the spare node. Then the node is repaired (restarted
                // with a good disk) and is the spare.
                let ms = chaos.members(&rt);
                let node = ms[(rng.next() % ms.len() as u64) as usize];
                chaos
                    .faults
                    .push(format!("disk EIO on storage node {node}"));
                chaos.kill("node", node);
                chaos.start_env("node", node, &[("FAILPOINTS", "disk-write-error=return")]);
                let deadline = Instant::now() + Duration::from_secs(90);
                while chaos.members(&rt).contains(&node) {
                    assert!(
                        Instant::now() < deadline,
                        "seed {seed}: the failing disk was not replaced"
                    );
                    std::thread::sleep(Duration::from_millis(300));
                }
                chaos.wait_whole(Duration::from_secs(90));
                chaos.kill("node", node);
                chaos.start("node", node);
            }
            _ => {
                // A member's disk turns slow (+30 ms a write) for a while.
                let ms = chaos.members(&rt);
                let node = ms[(rng.next() % ms.len() as u64) as usize];
                chaos
                    .faults
                    .push(format!("slow disk on storage node {node}"));
                chaos.kill("node", node);
                chaos.start_env(
                    "node",
                    node,
                    &[("FAILPOINTS", "disk-write-delay=sleep(30)")],
                );
                std::thread::sleep(Duration::from_millis(2000 + rng.next() % 3000));
                chaos.kill("node", node);
                chaos.start("node", node);
                chaos.wait_whole(Duration::from_secs(90));
            }
        }
        let f = failures.lock().unwrap().clone();
        assert!(
            f.is_empty(),
            "I/O failed (seed {seed}) after {:?}: {f:?}",
            chaos.faults
        );
    }

    // Power loss: everything at once, then the cluster again from its data directory.
    let mut faults = std::mem::take(&mut chaos.faults);
    faults.push("kill every process".into());
    let restarted = std::mem::take(&mut chaos.restarted);
    drop(chaos);
    stop.store(true, Ordering::Relaxed);
    drop(restarted); // kills every process this test started
    c.kill_everything();
    for w in writers {
        let _ = rt.block_on(w);
    }
    drop(vc);
    c.restart();
    let truth = truth.lock().unwrap().clone();
    let vc = rt.block_on(attach(true)).unwrap();
    rt.block_on(async {
        for (off, (acked, in_flight)) in &truth {
            let got = vc.read(*off, 4096).await.unwrap();
            let ok = (*acked > 0 && got == block(*off, *acked))
                || in_flight.is_some_and(|v| got == block(*off, v))
                || (*acked == 0 && got.iter().all(|b| *b == 0));
            assert!(
                ok,
                "seed {seed}: block {off} is neither version {acked} nor {in_flight:?}"
            );
        }
    });
    let chaos = Chaos {
        c: &c,
        restarted: HashMap::new(),
        faults,
        links: HashMap::new(),
    };
    chaos.wait_whole(Duration::from_secs(90));
    drop(vc);
    let vc = rt.block_on(attach(true)).unwrap();
    rt.block_on(async {
        let mut copies = Vec::new();
        for n in vc.replica_nodes() {
            copies.push(vc.read_replica(0, WRITERS * REGION, n).await.unwrap());
        }
        assert_eq!(copies.len(), 3);
        assert!(
            copies[0] == copies[1] && copies[1] == copies[2],
            "seed {seed}: replicas differ"
        );
    });
    let resynced: u64 = std::fs::read_dir(c.path("cairn-data/logs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.contains("resync finished") && !l.contains("full_copy=true"))
                .filter_map(|l| l.split(" bytes=").nth(1))
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    println!(
        "thrash: seed {seed}; {} faults injected: {:?}",
        chaos.faults.len(),
        chaos.faults
    );
    println!(
        "thrash: longest write {} ms; {} acknowledged blocks verified; resynced {} KiB (members back, not new ones' full copies) for {} KiB written while a member was away",
        longest_us.load(Ordering::Relaxed) / 1000,
        truth.len(),
        resynced / 1024,
        away_bytes / 1024
    );
}
