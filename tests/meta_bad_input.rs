//! Bad input against a real metadata member (in-process, RocksDB in a temp dir, real gRPC):
//! each gets the right code and a clear message, and the member keeps serving.

mod common;

use std::time::Duration;

use cairn_metadata::{MetaConfigFile, Server};
use cairn_proto::metadata as pb;
use cairn_proto::metadata::metadata_client::MetadataClient;
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;
use tonic::Code;

async fn start() -> (Server, MetadataClient<Channel>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_ports(1)[0];
    let cfg = MetaConfigFile::from_toml(&format!(
        "id = 1\nlisten = '127.0.0.1:{port}'\ndata_dir = '{}'\npeers = ['1=127.0.0.1:{port}']\nlease_ttl_ms = 60000",
        dir.path().display()
    ))
    .unwrap()
    .parse_and_validate()
    .unwrap();
    let server = Server::start(cfg).await.unwrap();
    for _ in 0..100 {
        if server.status().role == raft::StateRole::Leader {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, MetadataClient::new(ch), dir)
}

fn create(name: &str, size: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        pool: String::new(),
        replicas: 0,
        request_id: String::new(),
    }
}

#[track_caller]
fn expect<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let s = r.expect_err("request should have been refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(needle),
        "message {:?} lacks {needle:?}",
        s.message()
    );
}

/// Every request a user can get wrong, through the API: names, sizes, duplicates, leases,
/// shrinking, unknown objects, placement without nodes, malformed node and member requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let (mut server, mut c, _dir) = start().await;

    // Names and sizes.
    expect(
        c.create_volume(create("", 1 << 30)).await,
        Code::InvalidArgument,
        "is empty",
    );
    expect(
        c.create_volume(create("a/b", 1 << 30)).await,
        Code::InvalidArgument,
        "only letters",
    );
    expect(
        c.create_volume(create(&"x".repeat(65), 1 << 30)).await,
        Code::InvalidArgument,
        "longer than 64",
    );
    expect(
        c.create_volume(create("v", 0)).await,
        Code::InvalidArgument,
        "cannot be empty",
    );
    expect(
        c.create_volume(create("v", 4097)).await,
        Code::InvalidArgument,
        "multiple of the 4096-byte",
    );
    expect(
        c.create_volume(create("v", u64::MAX - 4095)).await,
        Code::InvalidArgument,
        "largest volume is 64 TiB",
    );
    let mut r = create("v", 1 << 30);
    r.replicas = 9;
    expect(
        c.create_volume(r).await,
        Code::InvalidArgument,
        "between 1 and 5",
    );
    let mut r = create("v", 1 << 30);
    r.pool = "nope".into();
    expect(
        c.create_volume(r).await,
        Code::NotFound,
        "pool \"nope\" does not exist",
    );

    // Duplicates.
    c.create_volume(create("db", 10 << 30)).await.unwrap();
    expect(
        c.create_volume(create("db", 10 << 30)).await,
        Code::AlreadyExists,
        "already exists",
    );

    // Unknown volumes.
    expect(
        c.get_volume(pb::GetVolumeRequest {
            name: "ghost".into(),
        })
        .await,
        Code::NotFound,
        "does not exist",
    );
    expect(
        c.delete_volume(pb::DeleteVolumeRequest {
            name: "ghost".into(),
        })
        .await,
        Code::NotFound,
        "does not exist",
    );

    // Resize: shrink refused, unaligned refused, grow fine.
    let shrink = pb::ResizeVolumeRequest {
        name: "db".into(),
        new_size_bytes: 1 << 30,
    };
    expect(
        c.resize_volume(shrink).await,
        Code::InvalidArgument,
        "shrinking it to 1 GiB is refused",
    );
    let odd = pb::ResizeVolumeRequest {
        name: "db".into(),
        new_size_bytes: (20 << 30) + 1,
    };
    expect(
        c.resize_volume(odd).await,
        Code::InvalidArgument,
        "multiple of",
    );
    c.resize_volume(pb::ResizeVolumeRequest {
        name: "db".into(),
        new_size_bytes: 20 << 30,
    })
    .await
    .unwrap();

    // Leases.
    let attach = |holder: &str, force| pb::AttachRequest {
        volume: "db".into(),
        holder: holder.into(),
        force,
    };
    let l1 = c
        .attach(attach("host-a", false))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    expect(
        c.attach(attach("host-b", false)).await,
        Code::FailedPrecondition,
        "use --force",
    );
    expect(
        c.attach(attach("", false)).await,
        Code::InvalidArgument,
        "holder",
    );
    expect(
        c.delete_volume(pb::DeleteVolumeRequest { name: "db".into() })
            .await,
        Code::FailedPrecondition,
        "attached by \"host-a\"",
    );
    let l2 = c
        .attach(attach("host-b", true))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert!(
        l2.generation > l1.generation,
        "a takeover bumps the generation"
    );
    let stale = pb::RenewLeaseRequest {
        volume: "db".into(),
        holder: "host-a".into(),
        generation: l1.generation,
    };
    expect(
        c.renew_lease(stale).await,
        Code::FailedPrecondition,
        "no longer held",
    );
    let renew = pb::RenewLeaseRequest {
        volume: "db".into(),
        holder: "host-b".into(),
        generation: l2.generation,
    };
    c.renew_lease(renew).await.unwrap();
    c.release(pb::ReleaseRequest {
        volume: "db".into(),
        holder: "host-b".into(),
        generation: l2.generation,
    })
    .await
    .unwrap();

    // Segments: past the end, and placement without any storage node.
    let seg = |i| pb::AllocateSegmentRequest {
        volume: "db".into(),
        segment_index: i,
        prefer_host: String::new(),
    };
    expect(
        c.allocate_segment(seg(20)).await,
        Code::OutOfRange,
        "past the end",
    );
    expect(
        c.allocate_segment(seg(0)).await,
        Code::FailedPrecondition,
        "needs 3 distinct failure domains",
    );

    // Nodes and members.
    expect(
        c.heartbeat(pb::HeartbeatRequest {
            node_id: 99,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "not registered",
    );
    let reg = pb::RegisterNodeRequest {
        node_uuid: String::new(),
        host: "h".into(),
        data_addr: "127.0.0.1:1".into(),
        ..Default::default()
    };
    expect(
        c.register_node(reg).await,
        Code::InvalidArgument,
        "node_uuid is required",
    );
    expect(
        c.add_member(pb::AddMemberRequest {
            id: 2,
            addr: "nowhere".into(),
        })
        .await,
        Code::InvalidArgument,
        "HOST:PORT",
    );
    expect(
        c.add_member(pb::AddMemberRequest {
            id: 1,
            addr: "127.0.0.1:5".into(),
        })
        .await,
        Code::AlreadyExists,
        "already exists",
    );
    expect(
        c.remove_member(pb::RemoveMemberRequest { id: 7 }).await,
        Code::NotFound,
        "does not exist",
    );
    let bad_pool = pb::Pool {
        name: "p".into(),
        replicas: 2,
        min_replicas: 3,
        failure_domain: 0,
    };
    expect(
        c.create_pool(pb::CreatePoolRequest {
            pool: Some(bad_pool),
        })
        .await,
        Code::InvalidArgument,
        "min_replicas",
    );
    let bad_level = pb::Pool {
        name: "p".into(),
        replicas: 3,
        min_replicas: 2,
        failure_domain: 42,
    };
    expect(
        c.create_pool(pb::CreatePoolRequest {
            pool: Some(bad_level),
        })
        .await,
        Code::InvalidArgument,
        "failure-domain",
    );
    expect(
        c.set_failpoint(pb::SetFailpointRequest {
            name: "nope".into(),
            actions: "return".into(),
        })
        .await,
        Code::InvalidArgument,
        "unknown failpoint",
    );

    // An oversized request (100 MiB name) is refused by the transport, and garbage bytes on the
    // port are dropped; neither harms the member.
    let huge = create(&"y".repeat(100 << 20), 1 << 30);
    assert!(c.create_volume(huge).await.is_err());
    let mut sock = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage \x16\x03\x01")
        .await
        .unwrap();
    drop(sock);

    // Still serving, and nothing half-done is visible.
    c.create_volume(create("after", 1 << 30)).await.unwrap();
    let names: Vec<String> = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["after", "db"]);
    server.shutdown().await.unwrap();
}

/// Placement through the API: four hosts of three disks register; segments land on groups of
/// three disks on three distinct hosts; the layout lists them; heartbeats mark nodes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_placed_across_registered_hosts() {
    let (mut server, mut c, _dir) = start().await;
    let mut ids = Vec::new();
    for h in 0..4 {
        let disks = (0..3)
            .map(|d| pb::Disk {
                uuid: format!("disk-{h}-{d}"),
                path: format!("/d{d}"),
                capacity_bytes: 1 << 40,
                used_bytes: 4 << 20,
                healthy: true,
                corrupt_reads: h,
                torn_blocks: 0,
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let reg = pb::RegisterNodeRequest {
            node_uuid: format!("node-{h}"),
            host: format!("host-{h}"),
            rack: String::new(),
            site: String::new(),
            data_addr: format!("127.0.0.1:{}", 9100 + h),
            disks: disks.clone(),
        };
        let id = c
            .register_node(reg.clone())
            .await
            .unwrap()
            .into_inner()
            .node_id;
        // Registration is idempotent on the node's uuid.
        assert_eq!(c.register_node(reg).await.unwrap().into_inner().node_id, id);
        c.heartbeat(pb::HeartbeatRequest {
            node_id: id,
            disks,
            ..Default::default()
        })
        .await
        .unwrap();
        ids.push(id);
    }
    c.create_volume(create("vm", 8 << 30)).await.unwrap();
    for i in 0..8 {
        let seg = pb::AllocateSegmentRequest {
            volume: "vm".into(),
            segment_index: i,
            prefer_host: "host-1".into(),
        };
        let g = c
            .allocate_segment(seg)
            .await
            .unwrap()
            .into_inner()
            .segment
            .unwrap()
            .group
            .unwrap();
        let hosts: std::collections::BTreeSet<_> =
            g.members.iter().map(|m| m.host.clone()).collect();
        assert_eq!(hosts.len(), 3, "{g:?}");
        assert_eq!(g.epoch, 1);
    }
    let layout = c
        .get_layout(pb::GetLayoutRequest {
            volume: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(layout.segments.len(), 8);
    assert_eq!(layout.volume.unwrap().allocated_segments, 8);
    let st = c
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.nodes.len(), 4);
    assert!(st.nodes.iter().all(|n| n.up));
    // The counters of the last heartbeat are shown: per node, 3 disks of 4 MiB used, and as
    // many corrupt reads per disk as the node's index.
    for n in &st.nodes {
        assert_eq!(n.disks.iter().map(|d| d.used_bytes).sum::<u64>(), 12 << 20);
    }
    assert_eq!(
        st.nodes
            .iter()
            .flat_map(|n| &n.disks)
            .map(|d| d.corrupt_reads)
            .sum::<u64>(),
        3 * (1 + 2 + 3)
    );
    assert_eq!(st.allocated_bytes, 8 << 30);
    server.shutdown().await.unwrap();
}
