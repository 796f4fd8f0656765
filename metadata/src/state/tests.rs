//! State machine tests: each checks one rule of `apply`.

use super::*;

fn env(now_ms: u64, cmd: Command) -> Envelope {
    Envelope { now_ms, cmd }
}

fn create(name: &str, size: u64, req: &str) -> Command {
    Command::CreateVolume(CreateVolume {
        name: VolumeName::try_from(name).unwrap(),
        size: VolumeSize::try_from(size).unwrap(),
        pool: PoolName::default_pool(),
        replicas: None,
        request_id: req.into(),
    })
}

fn vol(name: &str) -> VolumeName {
    VolumeName::try_from(name).unwrap()
}

fn with_nodes(hosts: usize, disks: usize) -> ClusterState {
    let mut s = ClusterState::default();
    for h in 0..hosts {
        let cmd = Command::RegisterNode {
            uuid: format!("node-{h}"),
            host: format!("host{h}"),
            rack: format!("rack{h}"),
            site: "s".into(),
            data_addr: format!("127.0.0.1:{}", 9000 + h),
            disks: (0..disks)
                .map(|d| DiskRecord {
                    uuid: format!("disk-{h}-{d}"),
                    path: format!("/d{d}"),
                    capacity_bytes: 1 << 40,
                    healthy: true,
                })
                .collect(),
        };
        assert!(matches!(s.apply(env(1, cmd)).0, Ok(Reply::Node(_))));
    }
    s
}

/// Names are unique; a retry with the same request id is answered with the volume; the state
/// rebuilt from the written records equals the state in memory.
#[test]
fn create_is_unique_and_idempotent() {
    let mut s = ClusterState::default();
    let mut all = Vec::new();
    let (r, w) = s.apply(env(1, create("a", 1 << 30, "req-1")));
    assert!(matches!(r, Ok(Reply::Volume(_))));
    all.extend(w);
    let (r, _) = s.apply(env(2, create("a", 1 << 30, "req-1")));
    assert!(
        matches!(r, Ok(Reply::Volume(v)) if v.created_ms == 1),
        "retry answered with the original"
    );
    let (r, _) = s.apply(env(3, create("a", 1 << 30, "req-2")));
    assert!(matches!(r, Err(MetaError::VolumeExists { .. })));
    assert_eq!(s.volumes.len(), 1);
    assert!(
        s.pools.contains_key(&PoolName::default_pool()),
        "default pool created on first use"
    );
    let mut kv: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for w in all {
        match w.value {
            Some(v) => kv.insert(w.key, v),
            None => kv.remove(&w.key),
        };
    }
    let rebuilt = ClusterState::from_records(kv.iter().map(|(k, v)| (&k[..], &v[..]))).unwrap();
    assert_eq!(rebuilt, s);
}

/// Resize grows only; shrinking is refused and changes nothing.
#[test]
fn resize_grows_only() {
    let mut s = ClusterState::default();
    let _ = s.apply(env(1, create("a", 2 << 30, "")));
    let (r, _) = s.apply(env(
        2,
        Command::ResizeVolume {
            name: vol("a"),
            size: VolumeSize::try_from(1 << 30).unwrap(),
        },
    ));
    assert!(matches!(r, Err(MetaError::ShrinkRefused { .. })));
    let (r, _) = s.apply(env(
        2,
        Command::ResizeVolume {
            name: vol("a"),
            size: VolumeSize::try_from(3 << 30).unwrap(),
        },
    ));
    assert!(matches!(r, Ok(Reply::Volume(v)) if v.size.bytes() == 3 << 30));
}

/// Leases: exclusive while live; a forced takeover or an expired lease bumps the generation;
/// renew and release need the current generation; an attached volume cannot be deleted.
#[test]
fn leases_fence_by_generation() {
    let mut s = ClusterState::default();
    let _ = s.apply(env(0, create("a", 1 << 30, "")));
    let attach = |holder: &str, force| Command::Attach {
        volume: vol("a"),
        holder: holder.into(),
        force,
        ttl_ms: 1000,
    };
    let (r, _) = s.apply(env(10, attach("h1", false)));
    assert!(matches!(r, Ok(Reply::Lease(v)) if v.generation == 1));
    let (r, _) = s.apply(env(20, attach("h2", false)));
    assert!(matches!(r, Err(MetaError::LeaseHeld { ref holder, .. }) if holder == "h1"));
    let (r, _) = s.apply(env(30, Command::DeleteVolume { name: vol("a") }));
    assert!(matches!(r, Err(MetaError::VolumeAttached { .. })));
    let (r, _) = s.apply(env(40, attach("h2", true)));
    assert!(matches!(r, Ok(Reply::Lease(v)) if v.generation == 2));
    // The old holder is fenced: its renew and release fail.
    let (r, _) = s.apply(env(
        50,
        Command::Renew {
            volume: vol("a"),
            holder: "h1".into(),
            generation: 1,
            ttl_ms: 1000,
        },
    ));
    assert!(matches!(r, Err(MetaError::LeaseLost { .. })));
    let (r, _) = s.apply(env(
        50,
        Command::Release {
            volume: vol("a"),
            holder: "h1".into(),
            generation: 1,
        },
    ));
    assert!(matches!(r, Err(MetaError::LeaseLost { .. })));
    // Expired: anyone may attach without force.
    let (r, _) = s.apply(env(5000, attach("h3", false)));
    assert!(matches!(r, Ok(Reply::Lease(v)) if v.generation == 3));
    let (r, _) = s.apply(env(
        5001,
        Command::Release {
            volume: vol("a"),
            holder: "h3".into(),
            generation: 3,
        },
    ));
    assert!(matches!(r, Ok(Reply::Done)));
    let (r, _) = s.apply(env(5002, Command::DeleteVolume { name: vol("a") }));
    assert!(matches!(r, Ok(Reply::Done)));
}

/// Segment allocation: idempotent per index, within the volume, R disks on R hosts, and
/// local groups preferred.
#[test]
fn segments_are_placed_across_hosts() {
    let mut s = with_nodes(4, 3);
    let _ = s.apply(env(0, create("a", 40 << 30, "")));
    let alloc = |i, host: &str| Command::AllocateSegment {
        volume: vol("a"),
        index: i,
        prefer_host: host.into(),
    };
    let (r, _) = s.apply(env(1, alloc(0, "")));
    let Ok(Reply::Segment { group, .. }) = r else {
        panic!("{r:?}")
    };
    let (r, _) = s.apply(env(1, alloc(0, "")));
    assert!(
        matches!(r, Ok(Reply::Segment { group: g, .. }) if g == group),
        "same segment, same group"
    );
    let (r, _) = s.apply(env(1, alloc(40, "")));
    assert!(matches!(r, Err(MetaError::SegmentOutOfRange { .. })));
    for i in 1..40 {
        assert!(s.apply(env(1, alloc(i, "host2"))).0.is_ok());
    }
    for g in s.groups.values() {
        let hosts: std::collections::BTreeSet<_> = g
            .disks
            .iter()
            .map(|d| d.split('-').nth(1).unwrap())
            .collect();
        assert_eq!(hosts.len(), 3, "group {g:?}");
    }
    assert_eq!(s.volumes[&vol("a")].allocated_segments, 40);
    // Once the pool has its groups, new segments go to groups with a disk on host2.
    let target = placement::target_groups(12, 3, GROUPS_PER_DISK);
    assert_eq!(s.groups.len(), target.min(40));
}

/// Placement with too few hosts fails with a clear error and allocates nothing.
#[test]
fn too_few_hosts() {
    let mut s = with_nodes(2, 2);
    let _ = s.apply(env(0, create("a", 1 << 30, "")));
    let (r, w) = s.apply(env(
        1,
        Command::AllocateSegment {
            volume: vol("a"),
            index: 0,
            prefer_host: String::new(),
        },
    ));
    let e = r.unwrap_err();
    assert!(matches!(e, MetaError::NoPlacement { .. }));
    let msg = tonic::Status::from(e).message().to_owned();
    assert!(
        msg.contains("needs 3 distinct failure domains") && msg.contains("has 2"),
        "{msg}"
    );
    assert!(w.is_empty(), "a rejected command writes nothing");
}

/// A member whose write failed leaves the active set (epoch + 1), not below `min_replicas`;
/// a report about an older epoch changes nothing; catching up and finishing each raise the
/// epoch; the records written rebuild the same state.
#[test]
fn membership_changes_follow_epochs() {
    use crate::membership::{Change, MemberState};
    let mut s = with_nodes(3, 1);
    let _ = s.apply(env(0, create("a", 1 << 30, "")));
    let (r, _) = s.apply(env(
        1,
        Command::AllocateSegment {
            volume: vol("a"),
            index: 0,
            prefer_host: String::new(),
        },
    ));
    let Ok(Reply::Segment { group, .. }) = r else {
        panic!("{r:?}")
    };
    let disks = s.groups[&group].disks.clone();
    let member = |s: &mut ClusterState, epoch, disk: &str, change| {
        s.apply(env(
            2,
            Command::Member {
                group,
                epoch,
                disk: disk.into(),
                change,
            },
        ))
    };
    assert!(member(&mut s, 1, &disks[0], Change::Failed).0.is_ok());
    assert_eq!(s.groups[&group].epoch, 2);
    assert_eq!(s.groups[&group].state_of(&disks[0]), MemberState::Stale);
    // The same failure reported by someone who saw epoch 1: nothing changes.
    assert!(member(&mut s, 1, &disks[1], Change::Failed).0.is_ok());
    assert_eq!(s.groups[&group].epoch, 2);
    assert_eq!(s.groups[&group].state_of(&disks[1]), MemberState::Active);
    // Two active members left and min_replicas is 2: no further member can go.
    assert!(matches!(
        member(&mut s, 2, &disks[1], Change::Failed).0,
        Err(MetaError::BelowMinReplicas { .. })
    ));
    // Finishing before starting, or at an old epoch, is refused.
    assert!(matches!(
        member(&mut s, 2, &disks[0], Change::FinishResync).0,
        Err(MetaError::WrongMemberState { .. })
    ));
    assert!(matches!(
        member(&mut s, 1, &disks[0], Change::BeginResync).0,
        Err(MetaError::EpochMoved { .. })
    ));
    assert!(member(&mut s, 2, &disks[0], Change::BeginResync).0.is_ok());
    assert_eq!(s.groups[&group].state_of(&disks[0]), MemberState::Syncing);
    let owner = |d: &str| {
        s.nodes
            .values()
            .find(|n| n.disks.iter().any(|x| x.uuid == d))
            .unwrap()
            .id
    };
    assert_eq!(s.stale_groups_of(owner(&disks[0])), vec![group]);
    assert_eq!(s.stale_groups_of(owner(&disks[1])), Vec::<u64>::new());
    let (r, w) = member(&mut s, 3, &disks[0], Change::FinishResync);
    assert!(r.is_ok() && !w.is_empty());
    assert!(s.groups[&group].whole());
    assert_eq!(s.groups[&group].epoch, 4);
    let rebuilt = ClusterState::from_records(
        s.all_records()
            .iter()
            .map(|w| (w.key.as_slice(), w.value.as_deref().unwrap())),
    )
    .unwrap();
    assert_eq!(rebuilt, s);
}
