//! Background scrub (DESIGN.md §5.5): a block corrupted on one replica's disk and a block
//! that differs on another replica (a write that reached only that member) are both found by
//! the scrub, without any client reading them, repaired from the healthy members, and
//! reported in `cairn status`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::data as dpb;
use common::UpCluster;

const CHUNK: u64 = 4 << 20;

fn block(seed: u32) -> Bytes {
    Bytes::from(
        (0..4096u32)
            .map(|i| (i.wrapping_mul(seed) ^ seed) as u8)
            .collect::<Vec<_>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_and_repairs_corrupt_and_divergent_replicas() {
    let c = UpCluster::start_with(&["--node-arg=--scrub-every-s=1"]);
    c.cairn(&["volume", "create", "emr", "--size", "64M"]);
    let meta = || MetaClient::new(&c.meta_addrs()).unwrap();
    let opts = || AttachOptions {
        holder: "test".into(),
        force: false,
        host: "x".into(),
    };
    let (a, b) = (block(7), block(13));
    let (at_a, at_b) = (8u64 << 20, 16u64 << 20);
    let vc = VolumeClient::attach(meta(), "emr", opts()).await.unwrap();
    vc.write(at_a, a.clone()).await.unwrap();
    vc.write(at_b, b.clone()).await.unwrap();

    // Node 3's copy of B changes by a write that reaches only that member, as a write from a
    // client that died half-way would.
    let g = c.first_group("emr").await;
    let m3 = g.members.iter().find(|m| m.host == "node-3").unwrap();
    let rogue = block(99);
    let req = dpb::Request {
        op: dpb::Op::Write as i32,
        volume: vc.id(),
        chunk: at_b / CHUNK,
        offset: 0,
        length: 4096,
        generation: vc.generation(),
        group: g.id,
        epoch: g.epoch,
        payload_crc: crc32c::crc32c(&rogue),
        disk: m3.disk_uuid.clone(),
        ..Default::default()
    };
    let dc = DataClient::connect(&m3.data_addr).await.unwrap();
    let (r, _) = dc.call(req, rogue).await.unwrap();
    assert_eq!(r.status, dpb::Status::Ok as i32, "{r:?}");
    let (vol, generation) = (vc.id(), vc.generation());
    vc.detach().await.unwrap();
    // Node 2's copy of A is damaged on its disk.
    common::corrupt_block(&c.path("cairn-data/node-2/disk0.img"), &a);

    // No client reads anything: the scrub has to find both.
    let status = || -> serde_json::Value {
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap()
    };
    let errors = |st: &serde_json::Value, host: &str| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["host"] == host)
            .unwrap()["disks"][0]["scrub_errors"]
            .as_u64()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let st = status();
        let found = errors(&st, "node-2") >= 1 && errors(&st, "node-3") >= 1;
        let whole = st["degraded_groups"].as_u64() == Some(0);
        let mut repaired = false;
        if found && whole {
            // Read each member's copy directly: an attach would reconcile the chunk with the
            // stray write itself (it is in the activity record) and hide what the scrub did.
            let g = c.first_group("emr").await;
            repaired = true;
            for m in &g.members {
                let got_a =
                    common::read_member(vol, generation, &g, m, at_a / CHUNK, at_a % CHUNK, 4096)
                        .await;
                let got_b =
                    common::read_member(vol, generation, &g, m, at_b / CHUNK, at_b % CHUNK, 4096)
                        .await;
                repaired &= got_a.is_ok_and(|d| d == a) && got_b.is_ok_and(|d| d == b);
            }
        }
        if repaired {
            // A quiet replica that agrees with the others is never flagged.
            assert_eq!(errors(&st, "node-1"), 0, "node-1 flagged: {st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scrub did not find and repair both replicas: {st}\nnode-2 log:\n{}\nnode-3 log:\n{}",
            std::fs::read_to_string(c.path("cairn-data/logs/node-2.log")).unwrap_or_default(),
            std::fs::read_to_string(c.path("cairn-data/logs/node-3.log")).unwrap_or_default(),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for node in [2, 3] {
        let log =
            std::fs::read_to_string(c.path(&format!("cairn-data/logs/node-{node}.log"))).unwrap();
        assert!(
            log.contains("scrub: this replica"),
            "node {node} reported nothing"
        );
        assert!(
            log.contains("resync finished"),
            "node {node} was not repaired by a resync"
        );
    }
}
