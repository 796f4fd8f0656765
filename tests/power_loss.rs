//! Power loss: every process of a `cairn up` cluster killed at once (SIGKILL) under four
//! writers, then the cluster started again from its data directory. Every acknowledged write
//! is there (or a write that was in flight over it), and the three replicas are identical
//! once the next attach has reconciled (DESIGN.md §5.1–§5.2).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::metadata as pb;
use common::{versioned_block as block, UpCluster};

const MIB: u64 = 1 << 20;

/// Per block: the last acknowledged version, and a version sent after it, if any.
type Truth = Arc<Mutex<HashMap<u64, (u64, Option<u64>)>>>;

async fn attach(meta: &str, force: bool) -> Arc<VolumeClient> {
    VolumeClient::attach(
        MetaClient::new(&[meta.to_owned()]).unwrap(),
        "pl",
        AttachOptions {
            holder: "power-loss-test".into(),
            force,
            host: "node-1".into(),
        },
    )
    .await
    .unwrap()
}

#[test]
fn every_acknowledged_write_survives_killing_every_process_at_once() {
    let mut c = UpCluster::start();
    c.cairn(&["volume", "create", "pl", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let truth: Truth = Arc::default();
    {
        let vc = rt.block_on(attach(&c.meta, false));
        // Four writers, each on its own 16 MiB, until the cluster dies under them.
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let (vc, truth) = (vc.clone(), truth.clone());
            writers.push(rt.spawn(async move {
                let mut x = 0x9E37_79B9 + w;
                for v in 1.. {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = w * 16 * MIB + (x % (16 * MIB / 4096)) * 4096;
                    truth.lock().unwrap().entry(off).or_insert((0, None)).1 = Some(v);
                    if vc.write(off, block(off, v)).await.is_err() {
                        return; // the cluster is gone
                    }
                    truth.lock().unwrap().insert(off, (v, None));
                }
            }));
        }
        std::thread::sleep(Duration::from_secs(3));
        c.kill_everything();
        // No write of this client may go on once the cluster is back (one waiting for the
        // metadata service would, and change blocks behind the truth recorded here).
        for w in writers {
            w.abort();
            let _ = rt.block_on(w);
        }
    }
    let truth = truth.lock().unwrap().clone();
    let acked = truth.values().filter(|(v, _)| *v > 0).count();
    assert!(
        acked > 100,
        "the writers got going ({acked} blocks acknowledged)"
    );

    c.restart();
    rt.block_on(async {
        // The dead client's lease may not have expired: take it over.
        let vc = attach(&c.meta, true).await;
        for (off, (acked, in_flight)) in &truth {
            let got = vc.read(*off, 4096).await.unwrap();
            let ok = (*acked > 0 && got == block(*off, *acked))
                || in_flight.is_some_and(|v| got == block(*off, v))
                || (*acked == 0 && got.iter().all(|b| *b == 0));
            assert!(
                ok,
                "block at {off}: neither version {acked} nor {in_flight:?}"
            );
        }
        // Wait for every member to be active (a report may have raced the kill), then
        // compare the replicas.
        let mc = MetaClient::new(std::slice::from_ref(&c.meta)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let l = mc
                .call(|mut cl| async move {
                    cl.get_layout(pb::GetLayoutRequest {
                        volume: "pl".into(),
                    })
                    .await
                })
                .await
                .unwrap();
            let whole = l.segments.iter().all(|s| {
                s.group.as_ref().is_some_and(|g| {
                    g.members
                        .iter()
                        .all(|m| m.state == pb::MemberState::Active as i32)
                })
            });
            if whole {
                break;
            }
            assert!(Instant::now() < deadline, "groups not whole again: {l:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(vc);
        let vc = attach(&c.meta, true).await;
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
}
