//! DESIGN.md §5.3 across services: after a forced takeover at the metadata service, a storage
//! node refuses the old holder's writes even before the new holder has sent it anything — it
//! learns the new generation from its heartbeat replies.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_client::MetaClient;
use cairn_metadata::{MetaConfigFile, Server};
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use cairn_storage_node::{DiskSpec, Node, NodeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_learns_generations_from_the_metadata_service() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let [mport, nport] = common::free_ports(2)[..] else {
        unreachable!()
    };
    let cfg = MetaConfigFile::from_toml(&format!(
        "id = 1\nlisten = '127.0.0.1:{mport}'\ndata_dir = '{}'\npeers = ['1=127.0.0.1:{mport}']",
        dir.path().join("meta").display()
    ))
    .unwrap()
    .parse_and_validate()
    .unwrap();
    let mut meta = Server::start(cfg).await.unwrap();
    let meta_addr = format!("127.0.0.1:{mport}");
    let node = Node::start(NodeConfig {
        data_dir: dir.path().join("node"),
        listen: format!("127.0.0.1:{nport}").parse().unwrap(),
        advertise: None,
        disks: vec![DiskSpec {
            path: dir.path().join("disk0.img"),
            create_size: Some(64 << 20),
        }],
        meta: vec![meta_addr.clone()],
        host: "h1".into(),
        rack: "h1".into(),
        site: "s".into(),
        heartbeat: Duration::from_millis(200),
        resync_every: Duration::from_secs(1),
        resync_rate: 0,
        slow_disk: Duration::from_millis(25),
        isolate_disk: Duration::from_millis(125),
        fence_after: Duration::from_secs(10),
        scrub: cairn_storage_node::scrub::ScrubConfig {
            every: Duration::ZERO,
            rate: 0,
            recheck: Duration::from_secs(1),
        },
    })
    .await
    .unwrap();

    let mc = MetaClient::new(&[meta_addr]).unwrap();
    let create = pb::CreateVolumeRequest {
        name: "db".into(),
        size_bytes: 1 << 30,
        ..Default::default()
    };
    let vol = mc
        .call(|mut c| {
            let r = create.clone();
            async move { c.create_volume(r).await }
        })
        .await
        .unwrap()
        .volume
        .unwrap();
    let attach = |holder: &'static str, force| {
        let mc = &mc;
        async move {
            mc.call(|mut c| async move {
                c.attach(pb::AttachRequest {
                    volume: "db".into(),
                    holder: holder.into(),
                    force,
                })
                .await
            })
            .await
            .unwrap()
            .lease
            .unwrap()
            .generation
        }
    };
    let old = attach("host-a", false).await;
    // The node serves once its first heartbeat has taught it the current marks.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !node.server.ready.load(std::sync::atomic::Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "the node never heard from the metadata service"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let data = DataClient::connect(&node.addr.to_string()).await.unwrap();
    let write = |generation| dpb::Request {
        op: dpb::Op::Write as i32,
        volume: vol.id,
        chunk: 0,
        offset: 0,
        length: 4096,
        generation,
        ..Default::default()
    };
    let (r, _) = data
        .call(write(old), Bytes::from(vec![1u8; 4096]))
        .await
        .unwrap();
    assert_eq!(r.status, dpb::Status::Ok as i32, "{r:?}");

    let new = attach("host-b", true).await;
    assert!(new > old);
    // No request with the new generation is sent: the node must learn it on its own.
    let deadline = Instant::now() + Duration::from_secs(15);
    while node.server.fence.generation(vol.id) < new {
        assert!(
            Instant::now() < deadline,
            "the node never learned generation {new}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r, _) = data
        .call(write(old), Bytes::from(vec![2u8; 4096]))
        .await
        .unwrap();
    assert_eq!(r.status, dpb::Status::Fenced as i32, "{r:?}");
    let read = dpb::Request {
        op: dpb::Op::Read as i32,
        ..write(new)
    };
    let (r, p) = data.call(read, Bytes::new()).await.unwrap();
    assert_eq!(r.status, dpb::Status::Ok as i32);
    assert!(p.iter().all(|&b| b == 1), "the fenced write did not land");
    node.shutdown().await;
    meta.shutdown().await.unwrap();
}
