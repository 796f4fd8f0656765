//! Crash at each step of the raft loop (failpoints abort the process on the spot) and prove no
//! acknowledged change is lost: not after the crash, not after the crashed member comes back,
//! not after every member restarts. Needs the `failpoints` feature; runs serially (see
//! .config/nextest.toml).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_metadata::failpoints as fp;
use cairn_proto::metadata as pb;
use cairn_proto::metadata::metadata_client::MetadataClient;
use common::*;

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Leader,
    Follower,
}

async fn set_failpoint(addr: &str, name: &str, actions: &str) {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    MetadataClient::new(ch)
        .set_failpoint(pb::SetFailpointRequest {
            name: name.into(),
            actions: actions.into(),
        })
        .await
        .expect("this build has failpoints");
}

async fn check(cluster: &MetaCluster, acked: &BTreeSet<String>) {
    let names = list_names(&cluster.client()).await;
    let got: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(got.len(), names.len(), "a name is listed twice");
    assert!(
        acked.is_subset(&got),
        "acknowledged creates lost: {:?}",
        acked.difference(&got).collect::<Vec<_>>()
    );
    assert_eq!(
        &got, acked,
        "every create was retried to success, so the sets are equal"
    );
}

/// Crashes `target` at failpoint `name` while a client creates volumes, then checks.
async fn crash_at(name: &str, target: Target) {
    let mut cluster = MetaCluster::start(3, &["--compact-threshold", "8"]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let victim = match target {
        Target::Leader => leader,
        Target::Follower => (1..=3).find(|&i| i != leader).unwrap(),
    };
    let client = cluster.client();
    let mut acked = BTreeSet::new();
    for i in 0..4 {
        let n = format!("before-{i}");
        create_volume(&client, &n, &n).await.unwrap();
        acked.insert(n);
    }
    // The victim first applies everything committed so far: else an entry it had not yet
    // applied could reach the failpoint before the failpoint's own reply is sent.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = member_status(&cluster.members[&leader].addr).await;
        let v = member_status(&cluster.members[&victim].addr).await;
        if let (Some(l), Some(v)) = (l, v) {
            if v.applied_index >= l.commit_index {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member {victim} does not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set_failpoint(&cluster.members[&victim].addr, name, "return").await;
    for i in 0..20 {
        let n = format!("during-{i}");
        // The same request id on every retry: a create that committed before the crash is
        // answered as a success, not "already exists".
        create_volume(&client, &n, &n)
            .await
            .unwrap_or_else(|e| panic!("create {n}: {e}"));
        acked.insert(n);
    }
    assert!(
        cluster.wait_exit(victim, Duration::from_secs(10)),
        "member {victim} never reached failpoint {name}; log:\n{}",
        cluster.log(victim)
    );
    check(&cluster, &acked).await;

    // The crashed member comes back (failpoints are per process: it starts clean).
    cluster.spawn(victim, false, &[]);
    cluster.converged(Duration::from_secs(30)).await;
    for i in 0..4 {
        let n = format!("after-{i}");
        create_volume(&client, &n, &n).await.unwrap();
        acked.insert(n);
    }
    check(&cluster, &acked).await;

    // Power loss for the whole cluster, more or less: kill -9 everyone, restart.
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id, false, &[]);
    }
    cluster.leader(Duration::from_secs(20)).await;
    check(&cluster, &acked).await;
    let st = cluster.converged(Duration::from_secs(30)).await;
    assert_eq!(st.volumes as usize, acked.len());
}

/// Leader crashes with new entries in hand, before persisting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_before_persist() {
    crash_at(fp::BEFORE_PERSIST, Target::Leader).await;
}

/// Leader crashes after persisting, before telling anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_after_persist() {
    crash_at(fp::AFTER_PERSIST, Target::Leader).await;
}

/// Leader crashes with committed entries not yet applied: the client never heard back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_before_apply() {
    crash_at(fp::BEFORE_APPLY, Target::Leader).await;
}

/// Leader crashes after applying, before replying: the change is in, the client retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_after_apply() {
    crash_at(fp::AFTER_APPLY, Target::Leader).await;
}

/// Leader crashes just before compacting its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_before_compact() {
    crash_at(fp::BEFORE_COMPACT, Target::Leader).await;
}

/// A follower crashes before persisting appended entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_before_persist() {
    crash_at(fp::BEFORE_PERSIST, Target::Follower).await;
}

/// A follower crashes after persisting, before acknowledging to the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_after_persist() {
    crash_at(fp::AFTER_PERSIST, Target::Follower).await;
}

/// A follower crashes before applying committed entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_before_apply() {
    crash_at(fp::BEFORE_APPLY, Target::Follower).await;
}

/// A rejoining member crashes while a snapshot is in hand but not installed; restarted, it
/// installs the snapshot and holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoining_member_before_snapshot_install() {
    let mut cluster = MetaCluster::start(3, &["--compact-threshold", "8"]);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let victim = (1..=3).find(|&i| i != leader).unwrap();
    let client = cluster.client();
    let mut acked = BTreeSet::new();
    cluster.kill(victim);
    cluster.wipe(victim);
    remove_member(&client, victim).await;
    for i in 0..30 {
        let n = format!("v{i}");
        create_volume(&client, &n, &n).await.unwrap();
        acked.insert(n);
    }
    add_member(&client, victim, &cluster.members[&victim].addr).await;
    let spec = format!("{}=return", fp::BEFORE_SNAPSHOT_INSTALL);
    cluster.spawn(victim, true, &[("FAILPOINTS", &spec)]);
    assert!(
        cluster.wait_exit(victim, Duration::from_secs(20)),
        "no snapshot arrived:\n{}",
        cluster.log(victim)
    );
    cluster.spawn(victim, true, &[]);
    let st = cluster.converged(Duration::from_secs(30)).await;
    assert_eq!(st.volumes, 30);
    let v = member_status(&cluster.members[&victim].addr).await.unwrap();
    assert_eq!(v.snapshots_installed, 1);
    // The rejoined member and one other hold everything.
    cluster.kill(leader);
    check(&cluster, &acked).await;
}
