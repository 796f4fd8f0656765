//! The metadata state machine's apply, in memory (no raft, no RocksDB): what every member does
//! per committed command — a lease renewal (the most frequent command), an attach, and a
//! volume create with its first segment placed (placement over 8 hosts × 4 disks).
//!
//! cargo bench -p cairn-benches --bench metadata_apply

use cairn_metadata::state::{ClusterState, Command, DiskRecord, Envelope};
use cairn_proto::{CreateVolume, PoolName, VolumeName, VolumeSize};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn cluster() -> ClusterState {
    let mut s = ClusterState::default();
    for h in 0..8 {
        let cmd = Command::RegisterNode {
            uuid: format!("node-{h}"),
            host: format!("host{h}"),
            rack: format!("rack{h}"),
            site: "s".into(),
            data_addr: format!("10.0.0.{h}:7111"),
            disks: (0..4)
                .map(|d| DiskRecord {
                    uuid: format!("disk-{h}-{d}"),
                    path: format!("/d{d}"),
                    capacity_bytes: 4 << 40,
                    healthy: true,
                })
                .collect(),
        };
        s.apply(Envelope { now_ms: 1, cmd }).0.unwrap();
    }
    s
}

fn create(name: &str) -> Command {
    Command::CreateVolume(CreateVolume {
        name: VolumeName::try_from(name).unwrap(),
        size: VolumeSize::try_from(10u64 << 30).unwrap(),
        pool: PoolName::default_pool(),
        replicas: None,
        request_id: format!("req-{name}"),
    })
}

fn bench(c: &mut Criterion) {
    let mut s = cluster();
    let vm = VolumeName::try_from("vm1").unwrap();
    s.apply(Envelope {
        now_ms: 1,
        cmd: create("vm1"),
    })
    .0
    .unwrap();
    s.apply(Envelope {
        now_ms: 1,
        cmd: Command::Attach {
            volume: vm.clone(),
            holder: "host-a".into(),
            force: false,
            ttl_ms: 30_000,
        },
    })
    .0
    .unwrap();
    let generation = s.volumes[&vm].generation;

    let mut g = c.benchmark_group("metadata_apply");
    g.throughput(Throughput::Elements(1));
    let mut now = 2;
    g.bench_function("renew_lease", |b| {
        b.iter(|| {
            now += 1;
            s.apply(Envelope {
                now_ms: now,
                cmd: Command::Renew {
                    volume: vm.clone(),
                    holder: "host-a".into(),
                    generation,
                    ttl_ms: 30_000,
                },
            })
        })
    });
    g.bench_function("attach_takeover", |b| {
        b.iter(|| {
            now += 1;
            s.apply(Envelope {
                now_ms: now,
                cmd: Command::Attach {
                    volume: vm.clone(),
                    holder: "host-a".into(),
                    force: true,
                    ttl_ms: 30_000,
                },
            })
        })
    });
    let base = cluster();
    let mut n = 0u64;
    g.bench_function("create_volume_and_place_segment", |b| {
        b.iter_batched(
            || {
                n += 1;
                (base.clone(), format!("v{n}"))
            },
            |(mut s, name)| {
                s.apply(Envelope {
                    now_ms: 5,
                    cmd: create(&name),
                })
                .0
                .unwrap();
                s.apply(Envelope {
                    now_ms: 5,
                    cmd: Command::AllocateSegment {
                        volume: VolumeName::try_from(name.as_str()).unwrap(),
                        index: 0,
                        prefer_host: String::new(),
                    },
                })
                .0
                .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
