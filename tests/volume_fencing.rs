//! Fencing, proven (DESIGN.md §5.3): after a forced takeover by a second client, every write
//! the first client still sends is refused by every replica — through its `VolumeClient`, and
//! sent raw to each member with its old generation. The second client's data stands.

mod common;

use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_client::{AttachOptions, MetaClient, VolumeClient, VolumeError};
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use common::UpCluster;

fn opts(holder: &str, force: bool) -> AttachOptions {
    AttachOptions {
        holder: holder.into(),
        force,
        host: "elsewhere".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_takeover_fences_every_replica() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "db", "--size", "64M"]);
    let meta = || MetaClient::new(std::slice::from_ref(&c.meta)).unwrap();

    let a = VolumeClient::attach(meta(), "db", opts("host-a", false))
        .await
        .unwrap();
    a.write(0, Bytes::from(vec![0xAA; 8192])).await.unwrap();
    assert_eq!(
        a.read(0, 8192).await.unwrap(),
        Bytes::from(vec![0xAA; 8192])
    );

    // Without force, the second client is refused while the first holds the lease.
    let refused = VolumeClient::attach(meta(), "db", opts("host-b", false)).await;
    assert!(
        matches!(&refused, Err(VolumeError::Meta(e)) if e.code() == tonic::Code::FailedPrecondition),
        "{:?}",
        refused.err()
    );
    let b = VolumeClient::attach(meta(), "db", opts("host-b", true))
        .await
        .unwrap();
    assert!(b.generation() > a.generation());

    // The first client's writes: refused, and it knows it is fenced.
    let r = a.write(0, Bytes::from(vec![0xBA; 4096])).await;
    assert!(matches!(r, Err(VolumeError::Fenced { .. })), "{r:?}");
    assert!(matches!(
        a.read(0, 4096).await,
        Err(VolumeError::Fenced { .. })
    ));

    // Sent raw to each member, with the old generation: every replica refuses.
    let layout = meta()
        .call(|mut c| async move {
            c.get_layout(pb::GetLayoutRequest {
                volume: "db".into(),
            })
            .await
        })
        .await
        .unwrap();
    let vol = layout.volume.unwrap();
    let group = layout.segments[0].group.clone().unwrap();
    assert_eq!(group.members.len(), 3);
    for m in &group.members {
        let dc = DataClient::connect(&m.data_addr).await.unwrap();
        let req = dpb::Request {
            op: dpb::Op::Write as i32,
            volume: vol.id,
            chunk: 0,
            offset: 0,
            length: 4096,
            generation: a.generation(),
            group: group.id,
            epoch: group.epoch,
            disk: m.disk_uuid.clone(),
            ..Default::default()
        };
        let (r, _) = dc.call(req, Bytes::from(vec![0xBB; 4096])).await.unwrap();
        assert_eq!(
            r.status,
            dpb::Status::Fenced as i32,
            "node {} took the old holder's write: {}",
            m.node_id,
            r.message
        );
    }

    // The second client sees its predecessor's acknowledged data, and nothing after it.
    assert_eq!(
        b.read(0, 8192).await.unwrap(),
        Bytes::from(vec![0xAA; 8192])
    );
    for m in &group.members {
        assert_eq!(
            b.read_replica(0, 8192, m.node_id).await.unwrap(),
            Bytes::from(vec![0xAA; 8192]),
            "node {}",
            m.node_id
        );
    }
    b.write(4096, Bytes::from(vec![0xCC; 4096])).await.unwrap();
    b.detach().await.unwrap();
    // After a clean detach, a new client attaches without force.
    let d = VolumeClient::attach(meta(), "db", opts("host-d", false))
        .await
        .unwrap();
    let mut want = vec![0xAA; 4096];
    want.extend_from_slice(&[0xCC; 4096]);
    assert_eq!(d.read(0, 8192).await.unwrap(), Bytes::from(want));
}
