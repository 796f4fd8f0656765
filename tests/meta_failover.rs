//! The metadata service is off the I/O path (DESIGN.md §4, §6): with three metadata members,
//! killing the leader (SIGKILL) under a writer does not stop the volume's I/O; a new leader is
//! elected, the writer's lease renewals go to it, and every acknowledged write reads back.

mod common;

use std::time::Duration;

use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use common::writer::{strided_offsets, BlockWriter};
use common::UpCluster;

fn block(offset: u64, v: u64) -> Bytes {
    Bytes::from(
        (0..4096u64)
            .map(|i| (offset / 4096 + v * 7 + i) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn killing_the_metadata_leader_does_not_stop_volume_io() {
    let c = UpCluster::start_with(&["--meta-replicas", "3"]);
    c.cairn(&["volume", "create", "mf", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vc = rt.block_on(async {
        VolumeClient::attach(
            MetaClient::new(&c.meta_addrs()).unwrap(),
            "mf",
            AttachOptions {
                holder: "failover-test".into(),
                force: false,
                host: "node-1".into(),
            },
        )
        .await
        .unwrap()
    });
    // Allocate the segment before the kill: a new segment needs the metadata service.
    rt.block_on(vc.write(0, block(0, 0))).unwrap();
    let mut writer = BlockWriter::start(
        &rt,
        vc.clone(),
        block,
        Duration::ZERO,
        strided_offsets(4096),
    );
    std::thread::sleep(Duration::from_secs(1));
    let status = || -> serde_json::Value {
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap()
    };
    let leader = status()["leader_id"].as_u64().unwrap();
    c.kill("meta", leader);
    let at_kill = writer.blocks_written();
    // Past a lease renewal (every 10 s with the default 30 s lease).
    std::thread::sleep(Duration::from_secs(12));
    writer.assert_running(&rt, "across the leader kill");
    assert!(writer.blocks_written() > at_kill, "writes went on");
    let after = status();
    assert_ne!(
        after["leader_id"].as_u64(),
        Some(leader),
        "a new leader: {after}"
    );
    let (writes, acked) = writer.stop(&rt);
    println!(
        "{} writes; longest {:?} across the leader kill",
        writes.count, writes.longest
    );
    rt.block_on(async {
        for (off, v) in &acked {
            assert_eq!(vc.read(*off, 4096).await.unwrap(), block(*off, *v));
        }
        vc.detach().await.unwrap();
    });
}
