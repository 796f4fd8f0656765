//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Cairn: replicated block storage for VM disks.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about)]
pub struct Cli {
    /// Metadata service address(es), comma-separated. Default: $CAIRN_META, else the local
    /// cluster of ./cairn-data.
    #[arg(long, global = true, env = "CAIRN_META", value_delimiter = ',')]
    pub meta: Vec<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local cluster under a data directory and keep it running (Ctrl-C stops it).
    Up(UpArgs),
    /// Create, list, inspect, resize and delete volumes.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// The cluster at a glance: metadata members, storage nodes, capacity.
    Status,
    /// Measure a volume through the client library: 4K random and 1M sequential jobs, with
    /// IOPS, bandwidth and latency percentiles. Overwrites the volume's first --size bytes.
    Bench(BenchArgs),
    /// Run and manage metadata members.
    Meta {
        #[command(subcommand)]
        command: MetaCommand,
    },
    /// Run a storage node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Serve volumes over NBD.
    Nbd {
        #[command(subcommand)]
        command: NbdCommand,
    },
    /// Serve a volume as a vhost-user-blk disk for QEMU.
    Vhost {
        #[command(subcommand)]
        command: VhostCommand,
    },
    /// Tools for operators and tests.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

/// The I/O runtime of a daemon (storage node, NBD and vhost gateways).
#[derive(Debug, Args)]
pub struct IoThreads {
    /// Threads running this daemon's I/O (connections, disk completions). One avoids
    /// cross-thread wake-ups on every request (measured in BENCHMARKS.md); raise it where one
    /// core is not enough for the clients of this process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

#[derive(Debug, Subcommand)]
pub enum NbdCommand {
    /// Serve every volume as an NBD export (export name = volume name) until stopped. Each
    /// volume's lease is taken at its first connection and given back after its last.
    Serve(NbdServeArgs),
}

#[derive(Debug, Args)]
pub struct NbdServeArgs {
    /// TCP address to listen on, IP:PORT (NBD's usual port is 10809).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Unix socket to listen on (created; an old one at the path is replaced).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// This machine's host name as the cluster knows it (reads prefer replicas here; new
    /// segments prefer groups with a disk here). Default: this machine's.
    #[arg(long)]
    pub host: Option<String>,
    #[command(flatten)]
    pub io: IoThreads,
}

#[derive(Debug, Subcommand)]
pub enum VhostCommand {
    /// Attach VOLUME (holding its lease for the life of the process) and serve it as a
    /// vhost-user-blk device on SOCKET; QEMU connects with
    /// `-chardev socket,path=SOCKET,reconnect=1 -device vhost-user-blk-pci,chardev=…`.
    /// One frontend at a time; when it leaves, the next may connect.
    Serve(VhostServeArgs),
}

#[derive(Debug, Args)]
pub struct VhostServeArgs {
    #[arg(long)]
    pub volume: String,
    /// The vhost-user unix socket to create (an old one at the path is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// Virtqueues (1–64), each served by a task of its own on the process's --threads.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Take the volume's lease from another holder (fencing its writes).
    #[arg(long)]
    pub force: bool,
    /// This machine's host name as the cluster knows it (reads prefer replicas here).
    #[arg(long)]
    pub host: Option<String>,
    #[command(flatten)]
    pub io: IoThreads,
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Read a range of a volume from one replica's copy only (no fallback, no repair), to
    /// stdout or --out. Attaches the volume (use --force to take it from a running gateway).
    ReadReplica {
        volume: String,
        /// Byte offset, a multiple of 4096 (suffixes K, M, G, T accepted).
        offset: String,
        /// Length, a multiple of 4096 (suffixes accepted).
        len: String,
        /// The storage node (id, as `cairn status` shows) whose copy to read.
        #[arg(long)]
        node: u64,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run a storage node in the foreground: serve its disks over the data protocol, register
    /// with the metadata service (--meta / CAIRN_META; without one it runs standalone).
    Run(NodeRunArgs),
}

#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// Directory for the node's identity, chunk indexes and fencing marks.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Data-protocol address to listen on, IP:PORT.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Address clients dial (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// A disk: a block device or file, PATH, or PATH:SIZE to create a sparse file of SIZE if
    /// it does not exist. Repeat for several disks.
    #[arg(long = "disk", required = true)]
    pub disks: Vec<cairn_storage_node::DiskSpec>,
    /// Failure domains: the host name (default: this machine's), rack and site.
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long, default_value = "")]
    pub rack: String,
    #[arg(long, default_value = "")]
    pub site: String,
    /// Most MB a second this node copies to bring a group member up to date (resync,
    /// re-replication), so client I/O keeps its share; 0: unlimited.
    #[arg(long, default_value_t = 200)]
    pub resync_mb_per_s: u64,
    /// A disk answering requests this slowly on average (milliseconds) is reported slow.
    #[arg(long, default_value_t = 25)]
    pub slow_disk_ms: u64,
    /// A disk answering requests this slowly on average (milliseconds) is isolated: reported
    /// unhealthy, its data moved to other disks.
    #[arg(long, default_value_t = 125)]
    pub isolate_disk_ms: u64,
    /// With no answer from the metadata service for this long (milliseconds), stop serving:
    /// the node may be on the minority side of a partition. 0: never.
    #[arg(long, default_value_t = 10_000)]
    pub fence_after_ms: u64,
    /// Seconds between background scrub passes (every block checked, replicas compared);
    /// 0: no scrub.
    #[arg(long, default_value_t = 86_400)]
    pub scrub_every_s: u64,
    /// Most MB a second the scrub reads; 0: unlimited.
    #[arg(long, default_value_t = 50)]
    pub scrub_mb_per_s: u64,
    /// Also serve every volume over NBD from this process, on this TCP address: the host's
    /// gateway inside its storage node, which reaches the node by function calls instead of a
    /// socket (as `cairn nbd serve --host` with this node's host name otherwise).
    #[arg(long)]
    pub nbd_listen: Option<std::net::SocketAddr>,
    /// Also serve NBD from this process on this Unix socket (created; an old one at the path
    /// is replaced).
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    #[command(flatten)]
    pub io: IoThreads,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where every process keeps its data, logs and cluster.json.
    #[arg(long, default_value = "./cairn-data")]
    pub data_dir: PathBuf,
    /// Number of metadata members: 1, 3 or 5 (default 1; on a re-run, what the data
    /// directory already holds).
    #[arg(long, value_parser = parse_replicas)]
    pub meta_replicas: Option<u64>,
    /// First TCP port; metadata members listen on BASE+1, BASE+2, …, storage nodes on
    /// BASE+11, BASE+12, …
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
    /// Number of storage nodes, each with one file-backed disk (default 3; a new cluster only).
    #[arg(long)]
    pub nodes: Option<u64>,
    /// Size of each node's disk file (sparse), e.g. 10G.
    #[arg(long, default_value = "10G")]
    pub disk_size: String,
    /// Where the NBD gateway listens (a new cluster only; it also serves
    /// `<data-dir>/nbd.sock`).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: std::net::SocketAddr,
    /// Where the NBD gateway runs (a new cluster only): inside storage node 1, which then
    /// reaches its own replica by function calls (`in-node`), or as a process of its own,
    /// `cairn nbd serve` (`separate`).
    #[arg(long, value_enum, default_value_t = Gateway::InNode)]
    pub gateway: Gateway,
    /// Passed to the metadata members (a new cluster only): how long a silent storage node
    /// has before its data is re-replicated, in milliseconds.
    #[arg(long)]
    pub replace_after_ms: Option<u64>,
    /// A flag passed to every storage node (a new cluster only), e.g.
    /// `--node-arg=--scrub-every-s=3600`; repeatable.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
}

/// Where `cairn up` runs the NBD gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Gateway {
    /// Inside storage node 1 (`cairn node run --nbd-listen`): the hyperconverged layout.
    InNode,
    /// A process of its own (`cairn nbd serve --host node-1`).
    Separate,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The volume to measure (it is attached for the run, then released).
    pub volume: String,
    /// Seconds per job.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// How much of the volume the jobs cover (written first), e.g. 1G.
    #[arg(long, default_value = "1G", value_parser = cairn_proto::parse_size)]
    pub size: u64,
    /// Go ahead even if the volume holds data (the benchmark overwrites it).
    #[arg(long)]
    pub overwrite: bool,
}

fn parse_replicas(s: &str) -> Result<u64, String> {
    match s {
        "1" => Ok(1),
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("{s:?}: a metadata cluster has 1, 3 or 5 members")),
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume.
    Create {
        name: String,
        /// Size, e.g. 10G, 512M, 1T (binary units), or bytes.
        #[arg(long)]
        size: String,
        /// Replication factor (default: the pool's, 3).
        #[arg(long)]
        replicas: Option<u32>,
        /// Pool (default: "default").
        #[arg(long)]
        pool: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Info { name: String },
    /// Grow a volume (shrinking is refused: it would destroy data).
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Delete a volume that nobody has attached.
    Delete { name: String },
    /// Take the volume's attach lease (normally done by the NBD / vhost frontends).
    Attach {
        name: String,
        /// Who holds the lease, e.g. the hypervisor host name.
        #[arg(long)]
        holder: String,
        /// Take the lease over from its current holder (fences the old one).
        #[arg(long)]
        force: bool,
    },
    /// Give the volume's attach lease back.
    Detach {
        name: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        generation: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetaCommand {
    /// Run one metadata member in the foreground.
    Run(MetaRunArgs),
    /// Show every member's raft status (each member answers for itself).
    Members,
    /// Add a member (start it afterwards with `cairn meta run --join`).
    AddMember {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    /// Remove a member from the cluster.
    RemoveMember {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Debug, Args)]
pub struct MetaRunArgs {
    /// A TOML configuration file (see etc/meta.example.toml); flags below override nothing and
    /// may not be combined with it.
    #[arg(long, conflicts_with_all = ["id", "listen", "data_dir", "peers"])]
    pub config: Option<PathBuf>,
    /// This member's raft id (1, 2, …).
    #[arg(long, required_unless_present = "config")]
    pub id: Option<u64>,
    /// Address to listen on, IP:PORT.
    #[arg(long, required_unless_present = "config")]
    pub listen: Option<String>,
    /// Address the others reach this member at (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory for the member's store.
    #[arg(long, required_unless_present = "config")]
    pub data_dir: Option<PathBuf>,
    /// Initial members, ID=HOST:PORT, comma-separated, this one included.
    #[arg(long, value_delimiter = ',', required_unless_present = "config")]
    pub peers: Vec<String>,
    /// Join an existing cluster instead of bootstrapping a new one.
    #[arg(long)]
    pub join: bool,
    /// Compact the raft log after this many applied entries.
    #[arg(long)]
    pub compact_threshold: Option<u64>,
    /// Raft tick in milliseconds.
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Attach lease time-to-live in milliseconds.
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
    /// A storage node silent this long (milliseconds) is gone for good: its data is
    /// re-replicated onto other hosts (default 10 minutes).
    #[arg(long)]
    pub replace_after_ms: Option<u64>,
    /// A flag passed to every storage node (a new cluster only), e.g.
    /// `--node-arg=--scrub-every-s=3600`; repeatable.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
}
