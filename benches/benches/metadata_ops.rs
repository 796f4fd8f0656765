//! Metadata operations per second through the gRPC API, against in-process members (real
//! RocksDB with synced raft-log writes in a temp dir on the work filesystem, real gRPC over
//! 127.0.0.1), with 1 and with 3 members.
//!
//! - `create/seq`: one create at a time — the commit latency (a synced raft append on a
//!   majority, then apply).
//! - `create/conc32`: 32 creates in flight — group commit folds them into few synced writes.
//! - `get/seq`: linearizable reads (ReadIndex, no log write).
//!
//! Run: `cargo bench -p cairn-benches --bench metadata_ops`

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_client::MetaClient;
use cairn_metadata::{MetaConfigFile, Server};
use cairn_proto::metadata as pb;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

struct Cluster {
    _servers: Vec<Server>,
    _dir: tempfile::TempDir,
    client: MetaClient,
}

async fn cluster(n: u64) -> Cluster {
    let dir = tempfile::tempdir_in(
        std::env::var("CAIRN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap();
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
    drop(ls);
    let peers: Vec<String> = (1..=n)
        .map(|i| format!("'{i}=127.0.0.1:{}'", ports[(i - 1) as usize]))
        .collect();
    let mut servers = Vec::new();
    for i in 1..=n {
        let cfg = MetaConfigFile::from_toml(&format!(
            "id = {i}\nlisten = '127.0.0.1:{}'\ndata_dir = '{}'\npeers = [{}]",
            ports[(i - 1) as usize],
            dir.path().join(format!("m{i}")).display(),
            peers.join(",")
        ))
        .unwrap()
        .parse_and_validate()
        .unwrap();
        servers.push(Server::start(cfg).await.unwrap());
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let client = MetaClient::new(&addrs).unwrap();
    // Wait for a leader.
    client
        .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
        .await
        .unwrap();
    Cluster {
        _servers: servers,
        _dir: dir,
        client,
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

async fn create(c: &MetaClient) -> String {
    let name = format!("bench-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let req = pb::CreateVolumeRequest {
        name,
        size_bytes: 1 << 30,
        pool: String::new(),
        replicas: 0,
        request_id: String::new(),
    };
    c.call(|mut cl| {
        let req = req.clone();
        async move { cl.create_volume(req).await }
    })
    .await
    .unwrap()
    .volume
    .unwrap()
    .name
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for members in [1u64, 3] {
        let cl = rt.block_on(cluster(members));
        let first = rt.block_on(create(&cl.client));
        let mut g = c.benchmark_group(format!("metadata/{members}-member"));
        g.sample_size(20)
            .measurement_time(Duration::from_secs(8))
            .warm_up_time(Duration::from_secs(2));

        g.throughput(Throughput::Elements(1));
        g.bench_function("create/seq", |b| {
            b.to_async(&rt).iter(|| create(&cl.client))
        });

        g.throughput(Throughput::Elements(32));
        g.bench_function("create/conc32", |b| {
            b.to_async(&rt).iter(|| async {
                futures::future::join_all((0..32).map(|_| create(&cl.client))).await
            })
        });

        g.throughput(Throughput::Elements(1));
        g.bench_function("get/seq", |b| {
            b.to_async(&rt).iter(|| async {
                cl.client
                    .call(|mut x| {
                        let name = first.clone();
                        async move { x.get_volume(pb::GetVolumeRequest { name }).await }
                    })
                    .await
                    .unwrap()
            })
        });
        g.finish();
        drop(cl);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
