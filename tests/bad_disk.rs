//! A disk that fails its writes, or answers them slowly, is isolated: its node reports it
//! unhealthy (after a failed write the engine stops serving; a disk whose requests take over
//! 125 ms on average is reported so), clients take it out of the active set, and its group
//! membership moves to a disk on the spare host, which copies the group's data — while a
//! writer goes on without an error. Every acknowledged write reads back, and the three current
//! replicas are identical. The faults come from failpoints in the disk's durable write path.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::metadata as pb;
use common::writer::{check_acked, strided_offsets, BlockWriter};
use common::{versioned_block as block, UpCluster};

const MIB: u64 = 1 << 20;

async fn attach(c: &UpCluster, force: bool) -> Arc<VolumeClient> {
    VolumeClient::attach(
        MetaClient::new(&c.meta_addrs()).unwrap(),
        "bd",
        AttachOptions {
            holder: "bad-disk-test".into(),
            force,
            host: "node-1".into(),
        },
    )
    .await
    .unwrap()
}

/// Restarts a member of the volume's group with `failpoints`, runs a writer until the
/// member's disk is replaced, and checks the data; returns the bad disk's `cairn status` entry.
fn bad_disk_is_replaced(failpoints: &str) -> serde_json::Value {
    let c = UpCluster::start_with(&["--nodes", "4"]);
    c.cairn(&["volume", "create", "bd", "--size", "64M"]);
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
    let victim = rt
        .block_on(c.first_group("bd"))
        .members
        .iter()
        .find(|m| m.host != "node-1")
        .unwrap()
        .host
        .clone();

    // The victim's node, started again on the bad disk.
    let id: u64 = victim.trim_start_matches("node-").parse().unwrap();
    c.kill("node", id);
    std::thread::sleep(Duration::from_millis(300));
    let _bad = c.respawn("node", id, &[("FAILPOINTS", failpoints)]);

    let writer = BlockWriter::start(
        &rt,
        vc.clone(),
        block,
        Duration::from_millis(2),
        strided_offsets(1024),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let g = rt.block_on(c.first_group("bd"));
        if !g.members.iter().any(|m| m.host == victim)
            && g.members
                .iter()
                .all(|m| m.state == pb::MemberState::Active as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline && !writer.is_finished(),
            "the bad disk was not replaced: {g:?}"
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
        .unwrap()
        .clone();
    assert_eq!(node["disks"][0]["healthy"], false, "{status}");
    let (writes, acked) = writer.stop(&rt);
    let writes = writes.count;
    println!("{writes} writes while the bad disk was isolated and replaced");

    rt.block_on(async {
        let vc = attach(&c, true).await;
        check_acked(&vc, 16 * MIB, block, &acked).await;
    });
    node
}

/// Every durable write fails after the first 20.
#[test]
fn a_failing_disk_is_isolated_and_its_data_re_replicated() {
    bad_disk_is_replaced("disk-write-error=20*off->return");
}

/// Every durable write takes 200 ms more: the latency shows, and isolates the disk.
#[test]
fn a_slow_disk_is_isolated_and_its_data_re_replicated() {
    let node = bad_disk_is_replaced("disk-write-delay=sleep(200)");
    assert!(
        node["disks"][0]["latency_us"].as_u64().unwrap() >= 125_000,
        "the slow disk's latency is reported: {node}"
    );
}
