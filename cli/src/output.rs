//! Human output (aligned tables) and `--json`.

use cairn_proto::format_size;
use cairn_proto::metadata as pb;
use comfy_table::{presets::NOTHING, Table};
use serde_json::{json, Value};

pub struct Printer {
    pub json: bool,
}

/// One line for an error: the service's message without gRPC decoration, or the error chain.
pub fn error_line(e: &anyhow::Error) -> String {
    if let Some(c) = e.downcast_ref::<cairn_client::MetaClientError>() {
        return c.to_string();
    }
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return s.message().to_owned();
    }
    format!("{e:#}")
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.to_vec());
    t
}

fn lease_json(l: &Option<pb::Lease>) -> Value {
    match l {
        Some(l) => {
            json!({"holder": l.holder, "generation": l.generation, "expires_unix_ms": l.expires_unix_ms})
        }
        None => Value::Null,
    }
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id, "name": v.name, "size_bytes": v.size_bytes, "pool": v.pool,
        "replicas": v.replicas, "block_size": v.block_size, "segment_size": v.segment_size,
        "allocated_segments": v.allocated_segments, "generation": v.generation,
        "lease": lease_json(&v.lease), "created_unix_ms": v.created_unix_ms,
    })
}

fn group_json(g: &Option<pb::PlacementGroup>) -> Value {
    match g {
        None => Value::Null,
        Some(g) => json!({
            "id": g.id, "epoch": g.epoch,
            "members": g.members.iter().map(|m| json!({
                "disk": m.disk_uuid, "node": m.node_id, "host": m.host, "data_addr": m.data_addr,
            })).collect::<Vec<_>>(),
        }),
    }
}

fn holder(v: &pb::Volume) -> String {
    v.lease.as_ref().map_or("-".into(), |l| {
        format!("{} (gen {})", l.holder, l.generation)
    })
}

impl Printer {
    fn print_json(&self, v: Value) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    }

    pub fn done(&self, msg: &str) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(json!({"ok": true, "message": msg}));
        }
        println!("{msg}");
        Ok(())
    }

    pub fn volume(&self, v: &pb::Volume) -> anyhow::Result<()> {
        self.volumes(std::slice::from_ref(v))
    }

    pub fn volumes(&self, vs: &[pb::Volume]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(Value::Array(vs.iter().map(volume_json).collect()));
        }
        let mut t = table(&["NAME", "SIZE", "ALLOCATED", "REPLICAS", "POOL", "ATTACHED"]);
        for v in vs {
            t.add_row(vec![
                v.name.clone(),
                format_size(v.size_bytes),
                format_size(v.allocated_segments * v.segment_size),
                v.replicas.to_string(),
                v.pool.clone(),
                holder(v),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn layout(&self, l: &pb::LayoutResponse) -> anyhow::Result<()> {
        let v = l
            .volume
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("reply without a volume"))?;
        if self.json {
            let mut j = volume_json(v);
            j["segments"] = l
                .segments
                .iter()
                .map(|s| json!({"index": s.index, "group": group_json(&s.group)}))
                .collect();
            return self.print_json(j);
        }
        let mut t = table(&["FIELD", "VALUE"]);
        for (k, val) in [
            ("name", v.name.clone()),
            ("id", v.id.to_string()),
            (
                "size",
                format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes),
            ),
            ("pool", v.pool.clone()),
            ("replicas", v.replicas.to_string()),
            ("block size", v.block_size.to_string()),
            (
                "segments",
                format!(
                    "{} of {} allocated",
                    v.allocated_segments,
                    v.size_bytes.div_ceil(v.segment_size)
                ),
            ),
            ("attached", holder(v)),
            ("generation", v.generation.to_string()),
        ] {
            t.add_row(vec![k.to_owned(), val]);
        }
        println!("{t}");
        if !l.segments.is_empty() {
            let mut s = table(&["SEGMENT", "GROUP", "EPOCH", "MEMBERS"]);
            for seg in &l.segments {
                let g = seg.group.as_ref();
                s.add_row(vec![
                    seg.index.to_string(),
                    g.map_or("-".into(), |g| g.id.to_string()),
                    g.map_or("-".into(), |g| g.epoch.to_string()),
                    g.map_or("-".into(), |g| {
                        g.members
                            .iter()
                            .map(|m| format!("{}@{}", m.disk_uuid, m.host))
                            .collect::<Vec<_>>()
                            .join(" ")
                    }),
                ]);
            }
            println!("\n{s}");
        }
        Ok(())
    }

    pub fn members(&self, ms: &[pb::Member]) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(
                ms.iter()
                    .map(|m| json!({"id": m.id, "addr": m.addr}))
                    .collect(),
            );
        }
        let mut t = table(&["ID", "ADDRESS"]);
        for m in ms {
            t.add_row(vec![m.id.to_string(), m.addr.clone()]);
        }
        println!("{t}");
        Ok(())
    }

    pub fn member_statuses(
        &self,
        rows: &[(String, Result<pb::MemberStatusResponse, String>)],
    ) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(
                rows.iter()
                    .map(|(addr, r)| match r {
                        Ok(s) => json!({
                            "addr": addr, "id": s.id, "role": s.role, "term": s.term,
                            "leader_id": s.leader_id, "commit_index": s.commit_index,
                            "applied_index": s.applied_index, "first_log_index": s.first_log_index,
                            "snapshots_installed": s.snapshots_installed, "volumes": s.volumes,
                            "state_digest": format!("{:016x}", s.state_digest),
                        }),
                        Err(e) => json!({"addr": addr, "error": e}),
                    })
                    .collect(),
            );
        }
        let mut t = table(&[
            "ADDRESS",
            "ID",
            "ROLE",
            "TERM",
            "COMMIT",
            "APPLIED",
            "LOG FROM",
            "SNAPSHOTS",
        ]);
        for (addr, r) in rows {
            match r {
                Ok(s) => t.add_row(vec![
                    addr.clone(),
                    s.id.to_string(),
                    s.role.clone(),
                    s.term.to_string(),
                    s.commit_index.to_string(),
                    s.applied_index.to_string(),
                    s.first_log_index.to_string(),
                    s.snapshots_installed.to_string(),
                ]),
                Err(e) => t.add_row(vec![addr.clone(), "-".into(), format!("unreachable: {e}")]),
            };
        }
        println!("{t}");
        Ok(())
    }

    pub fn status(&self, s: &pb::ClusterStatusResponse) -> anyhow::Result<()> {
        if self.json {
            return self.print_json(json!({
                "leader_id": s.leader_id, "term": s.term, "commit_index": s.commit_index,
                "members": s.members.iter().map(|m| json!({"id": m.id, "addr": m.addr})).collect::<Vec<_>>(),
                "nodes": s.nodes.iter().map(|n| json!({
                    "id": n.id, "host": n.host, "rack": n.rack, "site": n.site, "data_addr": n.data_addr,
                    "up": n.up, "disks": n.disks.iter().map(|d| json!({
                        "uuid": d.uuid, "path": d.path, "capacity_bytes": d.capacity_bytes, "healthy": d.healthy,
                        "used_bytes": d.used_bytes, "corrupt_reads": d.corrupt_reads, "torn_blocks": d.torn_blocks,
                        "latency_us": d.latency_us, "scrub_errors": d.scrub_errors,
                        "scrub_bytes": d.scrub_bytes,
                    })).collect::<Vec<_>>(),
                    "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
                    "heartbeat_rtt_us": n.heartbeat_rtt_us,
                    "heartbeat_failures": n.heartbeat_failures,
                    "heartbeat_gap_ms": n.heartbeat_gap_ms,
                })).collect::<Vec<_>>(),
                "volumes": s.volumes, "volume_bytes": s.volume_bytes,
                "allocated_bytes": s.allocated_bytes, "groups": s.groups,
                "degraded_groups": s.degraded_groups, "stale_members": s.stale_members,
                "syncing_members": s.syncing_members,
                "resyncs": s.resyncs.iter().map(|r| json!({
                    "group": r.group, "node_id": r.node_id, "disk_uuid": r.disk_uuid,
                    "full_copy": r.full_copy, "chunks_total": r.chunks_total,
                    "chunks_done": r.chunks_done, "bytes_copied": r.bytes_copied,
                })).collect::<Vec<_>>(),
            }));
        }
        let leader = s
            .members
            .iter()
            .find(|m| m.id == s.leader_id)
            .map_or("?".into(), |m| m.addr.clone());
        println!(
            "metadata: {} member(s), leader {} at {leader} (term {})",
            s.members.len(),
            s.leader_id,
            s.term
        );
        println!(
            "volumes:  {} ({} provisioned, {} allocated), {} placement groups",
            s.volumes,
            format_size(s.volume_bytes),
            format_size(s.allocated_bytes),
            s.groups
        );
        if s.degraded_groups > 0 {
            println!(
                "redundancy: {} placement group(s) degraded — {} member(s) missed writes, {} catching up",
                s.degraded_groups, s.stale_members, s.syncing_members
            );
        } else if s.groups > 0 {
            println!("redundancy: every placement group whole");
        }
        for r in &s.resyncs {
            println!(
                "  group {}: node {} {} — {}/{} chunks, {} copied",
                r.group,
                r.node_id,
                if r.full_copy {
                    "filling a new member"
                } else {
                    "catching up"
                },
                r.chunks_done,
                r.chunks_total,
                format_size(r.bytes_copied)
            );
        }
        if s.nodes.is_empty() {
            println!("storage nodes: none registered");
        } else {
            let mut t = table(&[
                "NODE",
                "HOST",
                "STATE",
                "DISKS",
                "USED",
                "CAPACITY",
                "CORRUPT",
                "TORN",
                "LATENCY",
                "SCRUBBED",
                "SCRUB BAD",
                "HB RTT",
                "HB GAP",
                "HB LOST",
                "ADDRESS",
            ]);
            for n in &s.nodes {
                let healthy = n.disks.iter().filter(|d| d.healthy).count();
                t.add_row(vec![
                    n.id.to_string(),
                    n.host.clone(),
                    if n.up { "up".into() } else { "down".into() },
                    format!("{healthy}/{} healthy", n.disks.len()),
                    format_size(n.disks.iter().map(|d| d.used_bytes).sum()),
                    format_size(n.disks.iter().map(|d| d.capacity_bytes).sum()),
                    n.disks
                        .iter()
                        .map(|d| d.corrupt_reads)
                        .sum::<u64>()
                        .to_string(),
                    n.disks
                        .iter()
                        .map(|d| d.torn_blocks)
                        .sum::<u64>()
                        .to_string(),
                    // The slowest disk's average request time.
                    format!(
                        "{:.1} ms",
                        n.disks.iter().map(|d| d.latency_us).max().unwrap_or(0) as f64 / 1000.0
                    ),
                    format_size(n.disks.iter().map(|d| d.scrub_bytes).sum()),
                    n.disks
                        .iter()
                        .map(|d| d.scrub_errors)
                        .sum::<u64>()
                        .to_string(),
                    // The link to the metadata service: heartbeat round trip, the longest
                    // silence in the last minute, heartbeats that got no answer.
                    format!("{:.1} ms", n.heartbeat_rtt_us as f64 / 1000.0),
                    format!("{:.1} s", n.heartbeat_gap_ms as f64 / 1000.0),
                    n.heartbeat_failures.to_string(),
                    n.data_addr.clone(),
                ]);
            }
            println!("\n{t}");
        }
        Ok(())
    }
}
