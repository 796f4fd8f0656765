//! Configuration of one metadata member: a TOML file or the equivalent command-line flags,
//! validated once by [`MetaConfigFile::parse_and_validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file form of a member's configuration. Every field is documented; unknown fields are
/// refused, so a misspelt setting is an error rather than silently ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetaConfigFile {
    /// This member's raft id, a positive integer unique in the cluster.
    pub id: u64,
    /// Address the gRPC API and the raft transport listen on, e.g. `127.0.0.1:7101`.
    pub listen: String,
    /// Address other members and clients use to reach this one (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Directory of the member's RocksDB store.
    pub data_dir: PathBuf,
    /// The cluster's initial members as `ID=HOST:PORT`, this one included. Used to bootstrap
    /// a new cluster, and to find the others when joining.
    pub peers: Vec<String>,
    /// Join an existing cluster (after `cairn meta add-member`) instead of bootstrapping one.
    /// Also the way back for a member whose data was lost.
    #[serde(default)]
    pub join: bool,
    /// Raft tick, in milliseconds.
    #[serde(default = "defaults::tick_ms")]
    pub tick_ms: u64,
    /// Ticks without a heartbeat before a follower campaigns (randomised up to twice this).
    #[serde(default = "defaults::election_ticks")]
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    #[serde(default = "defaults::heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// Compact the raft log once it holds this many applied entries.
    #[serde(default = "defaults::compact_threshold")]
    pub compact_threshold: u64,
    /// How long a volume attach lease lasts without renewal, in milliseconds.
    #[serde(default = "defaults::lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// A storage node without a heartbeat for this long is reported down, in milliseconds.
    #[serde(default = "defaults::node_down_after_ms")]
    pub node_down_after_ms: u64,
    /// A storage node without a heartbeat for this long is gone for good: its group
    /// memberships move to other disks, in milliseconds.
    #[serde(default = "defaults::replace_after_ms")]
    pub replace_after_ms: u64,
}

mod defaults {
    pub fn tick_ms() -> u64 {
        100
    }
    pub fn election_ticks() -> usize {
        10
    }
    pub fn heartbeat_ticks() -> usize {
        2
    }
    pub fn compact_threshold() -> u64 {
        10_000
    }
    pub fn lease_ttl_ms() -> u64 {
        30_000
    }
    pub fn node_down_after_ms() -> u64 {
        10_000
    }
    pub fn replace_after_ms() -> u64 {
        600_000
    }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub id: u64,
    pub listen: SocketAddr,
    pub advertise: String,
    pub data_dir: PathBuf,
    pub peers: BTreeMap<u64, String>,
    pub join: bool,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub compact_threshold: u64,
    pub lease_ttl: Duration,
    pub node_down_after: Duration,
    pub replace_after: Duration,
}

/// Parses `ID=HOST:PORT`.
pub fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?} must look like ID=HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("peer {s:?}: id must be a number"))?;
    if id == 0 {
        return Err(format!("peer {s:?}: ids start at 1"));
    }
    let addr = addr.trim();
    if addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(format!("peer {s:?}: address must be HOST:PORT"));
    }
    Ok((id, addr.to_owned()))
}

impl MetaConfigFile {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| format!("invalid metadata config: {e}"))
    }

    pub fn parse_and_validate(self) -> Result<MetaConfig, String> {
        let Self {
            id,
            listen,
            advertise,
            data_dir,
            peers,
            join,
            tick_ms,
            election_ticks,
            heartbeat_ticks,
            compact_threshold,
            lease_ttl_ms,
            node_down_after_ms,
            replace_after_ms,
        } = self;
        if id == 0 {
            return Err("id: member ids start at 1".into());
        }
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| format!("listen: {listen:?} is not an IP:PORT address"))?;
        let mut peer_map = BTreeMap::new();
        for p in &peers {
            let (pid, addr) = parse_peer(p)?;
            if peer_map.insert(pid, addr).is_some() {
                return Err(format!("peers: member {pid} is listed twice"));
            }
        }
        let advertise = advertise.unwrap_or_else(|| listen.to_string());
        match peer_map.get(&id) {
            Some(a) if *a != advertise => {
                return Err(format!(
                    "peers: this member ({id}) is listed at {a}, but advertises {advertise}"
                ))
            }
            None if !join => {
                return Err(format!(
                    "peers: this member ({id}) must be in its own peer list"
                ))
            }
            _ => {}
        }
        if peer_map.is_empty() {
            return Err("peers: at least one member is required".into());
        }
        if !(10..=60_000).contains(&tick_ms) {
            return Err("tick_ms: must be between 10 and 60000".into());
        }
        if heartbeat_ticks == 0 || election_ticks <= heartbeat_ticks {
            return Err("election_ticks must be greater than heartbeat_ticks (> 0)".into());
        }
        if compact_threshold < 2 {
            return Err("compact_threshold: must be at least 2".into());
        }
        if lease_ttl_ms < 1000 {
            return Err("lease_ttl_ms: must be at least 1000".into());
        }
        Ok(MetaConfig {
            id,
            listen,
            advertise,
            data_dir,
            peers: peer_map,
            join,
            tick: Duration::from_millis(tick_ms),
            election_ticks,
            heartbeat_ticks,
            compact_threshold,
            lease_ttl: Duration::from_millis(lease_ttl_ms),
            node_down_after: Duration::from_millis(node_down_after_ms),
            replace_after: Duration::from_millis(replace_after_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in example parses and validates.
    #[test]
    fn example_config_parses() {
        let text = include_str!("../../etc/meta.example.toml");
        let cfg = MetaConfigFile::from_toml(text)
            .unwrap()
            .parse_and_validate()
            .unwrap();
        assert_eq!(cfg.peers.len(), 3);
        assert_eq!(cfg.tick, Duration::from_millis(100));
    }

    /// Misspelt fields and inconsistent peers are refused with a message naming the field.
    #[test]
    fn bad_configs() {
        let e = MetaConfigFile::from_toml(
            "id = 1\nlisten='127.0.0.1:1'\ndata_dir='x'\npeers=[]\ntik_ms=5",
        )
        .unwrap_err();
        assert!(e.contains("tik_ms"), "{e}");
        let base = |peers: &[&str]| MetaConfigFile {
            id: 1,
            listen: "127.0.0.1:7101".into(),
            advertise: None,
            data_dir: "d".into(),
            peers: peers.iter().map(|s| s.to_string()).collect(),
            join: false,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_threshold: 100,
            lease_ttl_ms: 30_000,
            node_down_after_ms: 10_000,
            replace_after_ms: 600_000,
        };
        assert!(base(&["1=127.0.0.1:7101"]).parse_and_validate().is_ok());
        for (peers, needle) in [
            (&["2=127.0.0.1:7102"][..], "own peer list"),
            (&["1=127.0.0.1:9"][..], "advertises"),
            (&["1=127.0.0.1:7101", "1=127.0.0.1:7101"][..], "twice"),
            (&["x=127.0.0.1:7101"][..], "number"),
            (&["1=nowhere"][..], "HOST:PORT"),
        ] {
            let e = base(peers).parse_and_validate().unwrap_err();
            assert!(e.contains(needle), "{peers:?}: {e}");
        }
    }
}
