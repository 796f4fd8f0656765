//! A storage node killed (SIGKILL) under a write load, on a `cairn up` cluster: writes go on
//! after a short stall on the two remaining members (the dead one leaves the group's active
//! set, epoch + 1, and the writes are recorded as ones it missed); reads never go to it. The
//! node is started again: it copies exactly the chunks written while it was away, and
//! rejoins. Every acknowledged write reads back, and the three replicas are identical.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::metadata as pb;
use common::writer::{random_offsets, BlockWriter};
use common::{versioned_block as block, UpCluster};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;

#[test]
fn a_killed_node_is_written_around_then_resyncs_only_what_it_missed() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "v", "--size", "256M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let meta = || MetaClient::new(std::slice::from_ref(&c.meta)).unwrap();
    let vc = rt.block_on(async {
        VolumeClient::attach(
            meta(),
            "v",
            AttachOptions {
                holder: "failure-test".into(),
                force: false,
                host: "node-1".into(),
            },
        )
        .await
        .unwrap()
    });
    // 64 MiB (16 chunks) on all three replicas.
    rt.block_on(async {
        for off in (0..64 * MIB).step_by(MIB as usize) {
            let mut d = Vec::new();
            for b in (off..off + MIB).step_by(4096) {
                d.extend_from_slice(&block(b, 0));
            }
            vc.write(off, Bytes::from(d)).await.unwrap();
        }
    });

    // A writer of single blocks in the first 3 chunks, keeping what was acknowledged.
    let mut writer = BlockWriter::start(
        &rt,
        vc.clone(),
        block,
        Duration::ZERO,
        random_offsets(0x1234_5678, 3 * CHUNK / 4096),
    );
    std::thread::sleep(Duration::from_secs(1));

    // Kill node 2; the writes go on.
    c.kill("node", 2);
    let written_before = writer.blocks_written();
    let versions_at_kill = writer.acked();
    std::thread::sleep(Duration::from_secs(3));
    writer.assert_running(&rt, "while a node was down");
    let layout = |mc: MetaClient| {
        rt.block_on(async move {
            mc.call(|mut cl| async move {
                cl.get_layout(pb::GetLayoutRequest { volume: "v".into() })
                    .await
            })
            .await
            .unwrap()
        })
    };
    let states = |l: &pb::LayoutResponse| -> Vec<i32> {
        l.segments[0]
            .group
            .as_ref()
            .unwrap()
            .members
            .iter()
            .map(|m| m.state)
            .collect()
    };
    let degraded = layout(meta());
    assert_eq!(
        states(&degraded)
            .iter()
            .filter(|s| **s == pb::MemberState::Stale as i32)
            .count(),
        1,
        "the dead node left the group's active set: {degraded:?}"
    );
    assert!(writer.blocks_written() > written_before);
    let status = || -> serde_json::Value {
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap()
    };
    let st = status();
    assert_eq!(
        (st["degraded_groups"].as_u64(), st["stale_members"].as_u64()),
        (Some(1), Some(1)),
        "cairn status shows the lost redundancy: {st}"
    );

    // Start it again: it resyncs and rejoins while the writer goes on.
    let log_path = c.process("node", 2)["log"].as_str().unwrap().to_owned();
    let _node2 = c.respawn("node", 2, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = layout(meta());
        if states(&l)
            .iter()
            .all(|s| *s == pb::MemberState::Active as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 did not rejoin: {l:?}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status()["degraded_groups"].as_u64(), Some(0));
    std::thread::sleep(Duration::from_secs(1));
    let (writes, acked) = writer.stop(&rt);
    println!(
        "{} writes; longest write {:?} (the stall on the node kill)",
        writes.count, writes.longest
    );

    // Every acknowledged write reads back, through the client and from every replica.
    rt.block_on(async {
        for (off, v) in &acked {
            assert_eq!(vc.read(*off, 4096).await.unwrap(), block(*off, *v));
        }
        let mut copies = Vec::new();
        for node in vc.replica_nodes() {
            copies.push(vc.read_replica(0, 64 * MIB, node).await.unwrap());
        }
        assert_eq!(copies.len(), 3);
        assert!(
            copies[0] == copies[1] && copies[1] == copies[2],
            "replicas differ"
        );
    });
    // The resync copied chunks written while node 2 was away: some of the 3 the writer
    // touches, none of the other 13.
    let text = std::fs::read_to_string(&log_path).unwrap();
    let copied: u64 = text
        .lines()
        .filter(|l| l.contains("resync finished"))
        .filter_map(|l| l.split("chunks=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .map(|n| {
            n.trim_matches(|c: char| !c.is_ascii_digit())
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    let copied_bytes: u64 = text
        .lines()
        .filter(|l| l.contains("resync finished"))
        .filter_map(|l| l.split(" bytes=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    // Blocks written since the kill (a superset of those written while the node was away).
    let changed = acked
        .iter()
        .filter(|(off, v)| versions_at_kill.get(off) != Some(v))
        .count() as u64
        * 4096;
    println!("resync copied {copied} chunks, {copied_bytes} bytes; {changed} bytes changed since the kill");
    assert!(
        (1..=3).contains(&copied),
        "resync copied {copied} chunks; only 3 were written while the node was away\n{text}"
    );
    assert!(
        copied_bytes <= changed,
        "resync copied {copied_bytes} bytes, more than the {changed} written since the kill"
    );
}
