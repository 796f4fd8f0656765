//! A network partition (DESIGN.md §6): storage node 3 is reached only through fault proxies —
//! its data port, and its link to the metadata service — which are cut while a client writes.
//! The link goes silent (no reset), as a dead switch port would make it.
//!
//! - The client's writes stall until the link timeout, then go on with the two members it can
//!   reach; node 3 leaves the group's active set.
//! - A write that reaches node 3 alone just after the cut (from a client on its side) is
//!   taken, and never acknowledged by the cluster.
//! - Cut off from the metadata service, node 3 stops serving: the minority side takes no
//!   writes.
//! - Healed, node 3 resyncs — the blocks it missed, and the chunk its lone write touched — and
//!   rejoins. Every acknowledged write reads back from every replica, the lone write is
//!   gone, and `cairn status` shows the link's heartbeat gap.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use common::proxy::FaultProxy;
use common::writer::{random_offsets, BlockWriter};
use common::{versioned_block as block, UpCluster};

const CHUNK: u64 = 4 << 20;

/// A write of one block straight to one member, as a client on its side of the cut would.
async fn lone_write(
    addr: &str,
    vc: &VolumeClient,
    g: &pb::PlacementGroup,
    m: &pb::GroupMember,
    off: u64,
    data: Bytes,
) -> dpb::Response {
    let req = dpb::Request {
        op: dpb::Op::Write as i32,
        volume: vc.id(),
        chunk: off / CHUNK,
        offset: off % CHUNK,
        length: data.len() as u64,
        generation: vc.generation(),
        group: g.id,
        epoch: g.epoch,
        payload_crc: crc32c::crc32c(&data),
        disk: m.disk_uuid.clone(),
        seq: u64::MAX / 2,
        ..Default::default()
    };
    let c = DataClient::connect(addr).await.unwrap();
    c.call(req, data).await.unwrap().0
}

#[test]
fn a_cut_off_node_is_fenced_and_heals_by_resync() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "v", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();

    // Node 3 again, behind the proxies.
    let real = c.process("node", 3)["addr"].as_str().unwrap().to_owned();
    let data_proxy = rt.block_on(FaultProxy::start(real.parse().unwrap()));
    let meta_proxy = rt.block_on(FaultProxy::start(c.meta.parse().unwrap()));
    c.kill("node", 3);
    std::thread::sleep(Duration::from_millis(300));
    let (via_data, via_meta) = (data_proxy.addr.to_string(), meta_proxy.addr.to_string());
    let _node3 = c.respawn_with(
        "node",
        3,
        &[],
        &[
            ("--meta", via_meta.as_str()),
            ("--advertise", via_data.as_str()),
            ("--fence-after-ms", "4000"),
        ],
    );
    let status = || -> serde_json::Value {
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap()
    };
    let node3 = |st: &serde_json::Value| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["host"] == "node-3")
            .unwrap()
            .clone()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while node3(&status())["data_addr"] != via_data.as_str() {
        assert!(Instant::now() < deadline, "node 3 did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }

    let meta = || MetaClient::new(std::slice::from_ref(&c.meta)).unwrap();
    let vc = rt.block_on(async {
        let vc = VolumeClient::attach(
            meta(),
            "v",
            AttachOptions {
                holder: "partition-test".into(),
                force: false,
                host: "node-1".into(),
            },
        )
        .await
        .unwrap();
        // Version 0 of the first 4 chunks, on every replica.
        for off in (0..4 * CHUNK).step_by(1 << 20) {
            let mut d = Vec::new();
            for b in (off..off + (1 << 20)).step_by(4096) {
                d.extend_from_slice(&block(b, 0));
            }
            vc.write(off, Bytes::from(d)).await.unwrap();
        }
        vc
    });
    let g = rt.block_on(c.first_group("v"));
    let m3 = g
        .members
        .iter()
        .find(|m| m.host == "node-3")
        .unwrap()
        .clone();

    // A writer of single blocks in the first 3 chunks, keeping what was acknowledged.
    let mut writer = BlockWriter::start(
        &rt,
        vc.clone(),
        block,
        Duration::ZERO,
        random_offsets(0x2545_f491, 3 * CHUNK / 4096),
    );
    std::thread::sleep(Duration::from_secs(1));

    // The cut.
    data_proxy.cut();
    meta_proxy.cut();
    let at_cut = writer.blocks_written();
    // A client on node 3's side writes chunk 3 there, and only there.
    let lone = 3 * CHUNK + 8 * 4096;
    let r = rt.block_on(lone_write(&real, &vc, &g, &m3, lone, block(lone, 999)));
    assert_eq!(r.status, dpb::Status::Ok as i32, "{r:?}");

    // The writes go on without node 3 (after the link timeout), and it leaves the active set.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = rt.block_on(c.first_group("v"));
        let out = g
            .members
            .iter()
            .any(|m| m.host == "node-3" && m.state != pb::MemberState::Active as i32);
        if out && writer.blocks_written() > at_cut + 20 {
            break;
        }
        writer.assert_running(&rt, "during the partition");
        assert!(
            Instant::now() < deadline,
            "writes did not go on without node 3: {g:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Node 3, hearing nothing from the metadata service, stops taking writes and reads.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = rt.block_on(lone_write(&real, &vc, &g, &m3, lone, block(lone, 1000)));
        if r.status == dpb::Status::Unavailable as i32 {
            assert!(r.message.contains("cut off"), "{r:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 kept taking writes while cut off: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let the writer run on the two for a while.
    std::thread::sleep(Duration::from_secs(2));

    // Heal: node 3 resyncs and rejoins while the writer goes on.
    data_proxy.heal();
    meta_proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let g = rt.block_on(c.first_group("v"));
        if g.members
            .iter()
            .all(|m| m.state == pb::MemberState::Active as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 did not rejoin: {g:?}\n{}",
            std::fs::read_to_string(c.path("cairn-data/logs/node-3.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (writes, acked) = writer.stop(&rt);
    println!(
        "{} writes; longest write {:?} (the stall on the cut)",
        writes.count, writes.longest
    );

    // Every acknowledged write on every replica; the lone write undone everywhere. Read
    // straight from each member (a new attach would reconcile the chunk itself).
    let g = rt.block_on(c.first_group("v"));
    rt.block_on(async {
        for m in &g.members {
            let mut copy = Vec::new();
            for chunk in 0..4 {
                copy.extend_from_slice(
                    &common::read_member(vc.id(), vc.generation(), &g, m, chunk, 0, CHUNK)
                        .await
                        .unwrap(),
                );
            }
            for (off, v) in &acked {
                let at = *off as usize;
                assert!(
                    copy[at..at + 4096] == block(*off, *v)[..],
                    "{}: block at {off} is not the acknowledged version {v}",
                    m.host
                );
            }
            let at = lone as usize;
            assert!(
                copy[at..at + 4096] == block(lone, 0)[..],
                "{}: the write that reached only node 3 survived",
                m.host
            );
        }
    });

    // The link statistics saw it.
    let st = node3(&status());
    assert!(
        st["heartbeat_gap_ms"].as_u64().unwrap() >= 4000,
        "no heartbeat gap shown: {st}"
    );
    let log = std::fs::read_to_string(c.path("cairn-data/logs/node-3.log")).unwrap();
    assert!(log.contains("cut off from the cluster"), "{log}");
    assert!(log.contains("resync finished"), "{log}");
}
