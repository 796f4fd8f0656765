//! `VolumeClient` against a `cairn up` cluster: a replica with a corrupt block is passed over
//! for a good one and repaired from it; discard and write-zeroes read back as zeros and show as
//! holes; a range never written is a hole without asking anyone.

mod common;

use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient, VolumeError};
use common::UpCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_replica_is_read_around_and_repaired() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "pacs", "--size", "64M"]);
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let meta = || MetaClient::new(std::slice::from_ref(&c.meta)).unwrap();
    let opts = |host: &str| AttachOptions {
        holder: "test".into(),
        force: false,
        host: host.into(),
    };
    {
        let vc = VolumeClient::attach(meta(), "pacs", opts("x"))
            .await
            .unwrap();
        vc.write(8 << 20, Bytes::from(block.clone())).await.unwrap();
        vc.detach().await.unwrap();
    }
    // Damage node-2's copy behind its back.
    common::corrupt_block(&c.path("cairn-data/node-2/disk0.img"), &block);
    // A client on node-2's host reads its local copy first.
    let vc = VolumeClient::attach(meta(), "pacs", opts("node-2"))
        .await
        .unwrap();
    let status: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap();
    let node2 = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["host"] == "node-2")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let r = vc.read_replica(8 << 20, 4096, node2).await;
    assert!(
        matches!(&r, Err(VolumeError::Io(m)) if m.contains("CORRUPT")),
        "the damage is there: {r:?}"
    );
    // The read is answered from a good member, and the bad copy rewritten from it.
    assert_eq!(
        vc.read(8 << 20, 4096).await.unwrap(),
        Bytes::from(block.clone())
    );
    assert_eq!(
        vc.read_replica(8 << 20, 4096, node2).await.unwrap(),
        Bytes::from(block.clone()),
        "repaired"
    );

    // Discard and write-zeroes: zeros, and holes in the block status.
    const M: u64 = 1 << 20;
    vc.write(16 * M, Bytes::from(vec![1u8; 2 * M as usize]))
        .await
        .unwrap();
    vc.discard(16 * M, M / 2).await.unwrap();
    vc.write_zeroes(16 * M + M, M / 2, true).await.unwrap();
    vc.write_zeroes(16 * M + M + M / 2, 4096, false)
        .await
        .unwrap();
    let got = vc.read(16 * M, 2 * M).await.unwrap();
    assert!(got[..(M / 2) as usize].iter().all(|&b| b == 0));
    assert!(got[(M / 2) as usize..M as usize].iter().all(|&b| b == 1));
    assert!(got[M as usize..(M + M / 2 + 4096) as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(got[(M + M / 2 + 4096) as usize..].iter().all(|&b| b == 1));
    let runs = vc.block_status(16 * M, 2 * M).await.unwrap();
    assert_eq!(
        runs,
        vec![
            (M / 2, false),
            (M / 2, true),
            (M / 2, false),
            // Zeros written without punching (NBD's NO_HOLE) are data.
            (M / 2, true),
        ]
    );
    // A range never written: a hole.
    assert_eq!(
        vc.block_status(48 * M, 4 * M).await.unwrap(),
        vec![(4 * M, false)]
    );
    vc.detach().await.unwrap();
}
