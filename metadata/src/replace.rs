//! Nodes gone for good, and disks that keep failing: once a storage node has been silent past
//! the grace period, or reports a disk unhealthy (its writes failed), the leader moves each of
//! the node's (the disk's) group memberships to a healthy disk on a live host in a failure domain
//! the group does not use yet (the least loaded such disk). The new member starts stale and
//! marked for a full copy; its node then copies every chunk of the group from the active
//! members ([`crate::membership`], the storage node's resync), throttled, while the group
//! keeps serving on the others.
//!
//! Liveness is the leader's own (heartbeats are not replicated), so a new leader counts a
//! node's silence from when it became leader: a leader change never makes a node look gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::StateRole;

use crate::error::MetaError;
use crate::service::MetaService;
use crate::state::{ClusterState, Command};

/// One replacement the leader decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replacement {
    group: u64,
    epoch: u64,
    old: String,
    new: String,
}

/// The replacements due, given which nodes are gone and which are alive.
fn plan(s: &ClusterState, gone: &[u64], alive: &[u64]) -> Vec<Replacement> {
    let disk_node: BTreeMap<&str, u64> = s
        .nodes
        .values()
        .flat_map(|n| n.disks.iter().map(move |d| (d.uuid.as_str(), n.id)))
        .collect();
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for g in s.groups.values() {
        for d in &g.disks {
            *load.entry(d.as_str()).or_default() += 1;
        }
    }
    // A disk its node reports failing (its writes failed: the engine stopped serving) is
    // isolated at once, like a disk of a node gone for good.
    let failed: Vec<&str> = s
        .nodes
        .values()
        .flat_map(|n| n.disks.iter().filter(|d| !d.healthy))
        .map(|d| d.uuid.as_str())
        .collect();
    let mut out = Vec::new();
    for g in s.groups.values() {
        let Some(old) = g.disks.iter().find(|d| {
            failed.contains(&d.as_str())
                || disk_node.get(d.as_str()).is_some_and(|n| gone.contains(n))
        }) else {
            continue;
        };
        let level = s
            .pools
            .get(&g.pool)
            .map(|p| p.failure_domain)
            .unwrap_or_default();
        let used: Vec<String> = g
            .disks
            .iter()
            .filter(|d| *d != old)
            .filter_map(|d| disk_node.get(d.as_str()))
            .filter_map(|n| s.nodes.get(n))
            .map(|n| n.domain(level).to_owned())
            .collect();
        let best = s
            .nodes
            .values()
            .filter(|n| alive.contains(&n.id) && !used.iter().any(|u| u == n.domain(level)))
            .flat_map(|n| n.disks.iter().filter(|d| d.healthy))
            .min_by_key(|d| {
                (
                    load.get(d.uuid.as_str()).copied().unwrap_or(0),
                    d.uuid.clone(),
                )
            });
        if let Some(d) = best {
            *load.entry(d.uuid.as_str()).or_default() += 1;
            out.push(Replacement {
                group: g.id,
                epoch: g.epoch,
                old: old.clone(),
                new: d.uuid.clone(),
            });
        }
    }
    out
}

/// Every second, on the leader: replaces the memberships of nodes silent for `after`.
pub async fn replace_loop(api: Arc<MetaService>, after: Duration) {
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (role, poisoned) = {
            let st = api.raft.status.lock().expect("status lock");
            (st.role, st.poisoned.is_some())
        };
        if poisoned {
            return;
        }
        if role != StateRole::Leader {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let heard = api.liveness.lock().expect("liveness lock").clone();
        let state = match api.read(|s| s.clone()).await {
            Ok(s) => s,
            Err(MetaError::ShuttingDown) => return,
            Err(_) => continue,
        };
        let now = Instant::now();
        let (mut gone, mut alive) = (Vec::new(), Vec::new());
        for id in state.nodes.keys() {
            let last = heard.get(id).map_or(since, |l| l.at.max(since));
            if now.duration_since(last) >= after {
                gone.push(*id);
            } else if heard.contains_key(id) {
                alive.push(*id);
            }
        }
        let failing = state
            .nodes
            .values()
            .any(|n| n.disks.iter().any(|d| !d.healthy));
        if gone.is_empty() && !failing {
            continue;
        }
        for r in plan(&state, &gone, &alive) {
            tracing::warn!(group = r.group, old = %r.old, new = %r.new, "storage node gone for good; re-replicating its membership");
            let cmd = Command::Replace {
                group: r.group,
                epoch: r.epoch,
                old: r.old,
                new: r.new,
            };
            if let Err(e) = api.propose(cmd).await {
                tracing::warn!(error = %e, "replacement not made; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DiskRecord, Envelope, Reply};

    /// A group on three of four hosts loses one host: its membership goes to the fourth,
    /// never to a host the group already uses; with no spare host nothing is planned.
    #[test]
    fn replacements_go_to_a_live_host_the_group_does_not_use() {
        let mut s = ClusterState::default();
        let mut ids = Vec::new();
        for h in 0..4 {
            let cmd = Command::RegisterNode {
                uuid: format!("n{h}"),
                host: format!("h{h}"),
                rack: format!("h{h}"),
                site: "s".into(),
                data_addr: format!("127.0.0.1:{}", 9000 + h),
                disks: vec![DiskRecord {
                    uuid: format!("d{h}"),
                    path: "/d".into(),
                    capacity_bytes: 1 << 40,
                    healthy: true,
                }],
            };
            let Ok(Reply::Node(id)) = s.apply(Envelope { now_ms: 1, cmd }).0 else {
                panic!()
            };
            ids.push(id);
        }
        let mut g = crate::state::GroupRecord {
            id: 100,
            pool: cairn_proto::PoolName::default_pool(),
            epoch: 3,
            disks: vec!["d0".into(), "d1".into(), "d2".into()],
            segments: 1,
            states: Default::default(),
            full_copy: Default::default(),
        };
        s.groups.insert(100, g.clone());
        let plan1 = plan(&s, &[ids[1]], &[ids[0], ids[2], ids[3]]);
        assert_eq!(
            plan1,
            vec![Replacement {
                group: 100,
                epoch: 3,
                old: "d1".into(),
                new: "d3".into()
            }]
        );
        // The fourth host is down too: nowhere to go.
        assert!(plan(&s, &[ids[1]], &[ids[0], ids[2]]).is_empty());
        // Applied: the new member is stale and marked for a full copy; epoch + 1.
        let cmd = Command::Replace {
            group: 100,
            epoch: 3,
            old: "d1".into(),
            new: "d3".into(),
        };
        assert!(s
            .apply(Envelope {
                now_ms: 2,
                cmd: cmd.clone()
            })
            .0
            .is_ok());
        let after = s.groups[&100].clone();
        assert_eq!(after.disks, vec!["d0", "d3", "d2"]);
        assert!(after.needs_full_copy("d3") && after.epoch == 4);
        // The same replacement again (an old epoch) is refused.
        assert!(s.apply(Envelope { now_ms: 3, cmd }).0.is_err());
        // A disk in a host the group uses is refused.
        g.epoch = 4;
        g.disks = after.disks.clone();
        let cmd = Command::Replace {
            group: 100,
            epoch: 4,
            old: "d3".into(),
            new: "d0".into(),
        };
        assert!(s.apply(Envelope { now_ms: 4, cmd }).0.is_err());
    }
}
