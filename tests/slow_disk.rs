//! A slow disk (the `disk-write-delay` failpoint: every durable write takes 200 ms more) is
//! seen in its node's latency statistics, shown in `cairn status`, and isolated once its
//! average passes 125 ms: reported unhealthy, its group membership moves to a disk on the
//! spare host, which copies the group's data, while a writer goes on without an error. Every
//! acknowledged write reads back, and the three current replicas are identical.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::metadata as pb;
use common::UpCluster;

const MIB: u64 = 1 << 20;

fn block(offset: u64, v: u64) -> Bytes {
    Bytes::from(
        (0..4096u64)
            .map(|i| (offset / 4096 * 13 + v * 5 + i) as u8)
            .collect::<Vec<u8>>(),
    )
}

async fn attach(c: &UpCluster, force: bool) -> Arc<VolumeClient> {
    VolumeClient::attach(
        MetaClient::new(&c.meta_addrs()).unwrap(),
        "sd",
        AttachOptions {
            holder: "slow-disk-test".into(),
            force,
            host: "node-1".into(),
        },
    )
    .await
    .unwrap()
}

/// The process started again with a failing disk; killed at the end.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_slow_disk_is_isolated_and_its_data_re_replicated() {
    let c = UpCluster::start_with(&["--nodes", "4"]);
    c.cairn(&["volume", "create", "sd", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let vc = rt.block_on(attach(&c, false));
    rt.block_on(async {
        for off in (0..16 * MIB).step_by(MIB as usize) {
            let mut d = Vec::new();
            for b in (off..off + MIB).step_by(4096) {
                d.extend_from_slice(&block(b, 0));
            }
            vc.write(off, Bytes::from(d)).await.unwrap();
        }
    });
    let group = || {
        let mc = MetaClient::new(&c.meta_addrs()).unwrap();
        rt.block_on(async move {
            mc.call(|mut cl| async move {
                cl.get_layout(pb::GetLayoutRequest {
                    volume: "sd".into(),
                })
                .await
            })
            .await
            .unwrap()
            .segments[0]
                .group
                .clone()
                .unwrap()
        })
    };
    let before = group();
    let victim = before
        .members
        .iter()
        .find(|m| m.host != "node-1")
        .unwrap()
        .host
        .clone();

    // The victim's node, started again on a disk whose every write takes 200 ms more.
    let id: u64 = victim.trim_start_matches("node-").parse().unwrap();
    let entry = c.cluster_file()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "node" && p["id"] == id)
        .unwrap()
        .clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(entry["pid"].as_u64().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let cmd: Vec<String> = entry["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(entry["log"].as_str().unwrap())
        .unwrap();
    let _failing = KillOnDrop(
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("FAILPOINTS", "disk-write-delay=sleep(200)")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vc, acked, stop) = (vc.clone(), acked.clone(), stop.clone());
        rt.spawn(async move {
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                let off = (v * 7919 % 1024) * 4096;
                vc.write(off, block(off, v)).await?;
                acked.lock().unwrap().insert(off, v);
                v += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<_, cairn_client::VolumeError>(v - 1)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let g = group();
        if !g.members.iter().any(|m| m.host == victim)
            && g.members
                .iter()
                .all(|m| m.state == pb::MemberState::Active as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline && !writer.is_finished(),
            "the slow disk was not replaced: {g:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let status: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap();
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["host"] == victim.as_str())
        .unwrap();
    assert_eq!(node["disks"][0]["healthy"], false, "{status}");
    assert!(
        node["disks"][0]["latency_us"].as_u64().unwrap() >= 125_000,
        "the slow disk's latency is reported: {status}"
    );
    stop.store(true, Ordering::Relaxed);
    let writes = rt.block_on(writer).unwrap().unwrap();
    println!("{writes} writes while the disk was slow and was replaced");

    let acked = acked.lock().unwrap().clone();
    rt.block_on(async {
        let vc = attach(&c, true).await;
        for b in (0..16 * MIB).step_by(4096) {
            let want = block(b, acked.get(&b).copied().unwrap_or(0));
            assert_eq!(vc.read(b, 4096).await.unwrap(), want, "block at {b}");
        }
        let nodes = vc.replica_nodes();
        assert_eq!(nodes.len(), 3);
        let mut copies = Vec::new();
        for n in nodes {
            copies.push(vc.read_replica(0, 16 * MIB, n).await.unwrap());
        }
        assert!(
            copies[0] == copies[1] && copies[1] == copies[2],
            "replicas differ"
        );
    });
}
