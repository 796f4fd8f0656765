//! A storage node gone for good: past the grace period (3 s here, 10 minutes by default) the
//! leader moves its group membership to a disk on the fourth host, which copies every chunk
//! of the group from the active members (throttled) while a writer goes on, then serves.
//! Every acknowledged write reads back, and the three current replicas are identical.

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
        "nr",
        AttachOptions {
            holder: "replacement-test".into(),
            force,
            host: "node-1".into(),
        },
    )
    .await
    .unwrap()
}

#[test]
fn a_node_gone_for_good_is_replaced_and_its_data_copied_elsewhere() {
    let c = UpCluster::start_with(&["--nodes", "4", "--replace-after-ms", "3000"]);
    c.cairn(&["volume", "create", "nr", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let vc = rt.block_on(attach(&c, false));
    // 32 MiB of version 0.
    rt.block_on(async {
        for off in (0..32 * MIB).step_by(4096) {
            if off % MIB == 0 {
                let mut d = Vec::new();
                for b in (off..off + MIB).step_by(4096) {
                    d.extend_from_slice(&block(b, 0));
                }
                vc.write(off, Bytes::from(d)).await.unwrap();
            }
        }
    });
    let group = || rt.block_on(c.first_group("nr"));
    let before = group();
    let victim = before
        .members
        .iter()
        .find(|m| m.host != "node-1")
        .unwrap()
        .host
        .clone();
    let spare: Vec<String> = (1..=4)
        .map(|i| format!("node-{i}"))
        .filter(|h| !before.members.iter().any(|m| &m.host == h))
        .collect();
    assert_eq!(spare.len(), 1, "one host holds no copy: {before:?}");

    let writer = BlockWriter::start(
        &rt,
        vc.clone(),
        block,
        Duration::from_millis(2),
        strided_offsets(2048), // the first 8 MiB
    );
    let id: u64 = victim.trim_start_matches("node-").parse().unwrap();
    c.kill("node", id);

    let killed_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    let after = loop {
        let g = group();
        let replaced = !g.members.iter().any(|m| m.host == victim)
            && g.members
                .iter()
                .all(|m| m.state == pb::MemberState::Active as i32);
        if replaced {
            break g;
        }
        assert!(
            Instant::now() < deadline && !writer.is_finished(),
            "not re-replicated: {g:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let took = killed_at.elapsed();
    assert!(after.members.iter().any(|m| m.host == spare[0]));
    let (writes, acked) = writer.stop(&rt);
    let writes = writes.count;
    // What the new member copied, from its log.
    let log = c.path(&format!("cairn-data/logs/{}.log", spare[0]));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let (copy_bytes, copy_ms) = text
        .lines()
        .filter(|l| l.contains("resync finished"))
        .map(|l| {
            let field = |name: &str| {
                l.split(&format!(" {name}="))
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (field("bytes"), field("ms"))
        })
        .fold((0, 0), |(b, m), (x, y)| (b + x, m + y));
    println!(
        "re-replication: {:.1} MiB copied in {copy_ms} ms ({:.0} MiB/s); replaced {:.1} s after the kill (grace 3 s); {writes} client writes meanwhile ({:.0}/s)",
        copy_bytes as f64 / MIB as f64,
        copy_bytes as f64 / MIB as f64 / (copy_ms.max(1) as f64 / 1000.0),
        took.as_secs_f64(),
        writes as f64 / took.as_secs_f64()
    );

    rt.block_on(async {
        let vc = attach(&c, true).await;
        check_acked(&vc, 32 * MIB, block, &acked).await;
    });
}
