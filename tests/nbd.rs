//! Replicated volumes end to end through NBD, with the real clients users run — qemu-img,
//! qemu-io, nbdinfo, nbdcopy, fio — against a `cairn up` cluster (3 storage nodes, 3 replicas).

mod common;

use std::time::Duration;

use common::{run_tool, UpCluster};

/// A qcow2 image with holes goes into a volume with `qemu-img convert` and comes back out
/// byte-identical; `nbdinfo --map` shows the holes as holes; `nbdinfo --list` lists the
/// volumes; `nbdcopy` copies both ways.
#[test]
fn qemu_img_nbdcopy_and_nbdinfo() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "img", "--size", "256M"]);
    c.cairn(&["volume", "create", "other", "--size", "64M"]);
    let src = c.path("src.qcow2");
    let (src_s, reference) = (src.to_str().unwrap(), c.path("ref.raw"));
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", src_s, "256M"]);
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "write -P 0xa5 40M 512K",
            "-c",
            "write -P 0x11 200M 4M",
            src_s,
        ],
    );
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            src_s,
            reference.to_str().unwrap(),
        ],
    );
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            src_s,
            &c.uri("img"),
        ],
    );
    let out = c.path("out.raw");
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &c.uri("img"),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(),
        "the image came back different"
    );

    // The map: data exactly where the image has data, holes elsewhere.
    let map = String::from_utf8(run_tool("nbdinfo", &["--map", &c.uri("img")]).stdout).unwrap();
    let extents: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.2 == 0)
        .map(|e| (e.0, e.1))
        .collect();
    const M: u64 = 1 << 20;
    assert_eq!(
        data,
        vec![(M, 2 * M), (40 * M, M / 2), (200 * M, 4 * M)],
        "{map}"
    );
    assert!(
        extents.iter().all(|e| e.2 == 0 || e.2 == 3),
        "holes read as hole,zero: {map}"
    );
    assert_eq!(extents.iter().map(|e| e.1).sum::<u64>(), 256 * M);

    let list =
        String::from_utf8(run_tool("nbdinfo", &["--list", &format!("nbd://{}", c.nbd)]).stdout)
            .unwrap();
    assert!(
        list.contains("export=\"img\"") && list.contains("export=\"other\""),
        "{list}"
    );

    // nbdcopy both ways, through the unix socket too.
    let sock = c.tmp.path().join("cairn-data/nbd.sock");
    let unix_uri = format!("nbd+unix:///other?socket={}", sock.display());
    let small = c.path("small.raw");
    std::fs::write(
        &small,
        (0..64 * M)
            .map(|i| (i / 4096 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    run_tool("nbdcopy", &[small.to_str().unwrap(), &unix_uri]);
    let back = c.path("back.raw");
    run_tool("nbdcopy", &[&c.uri("other"), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&small).unwrap());
}

fn fio(c: &UpCluster, name: &str, extra: &[&str]) {
    let uri = format!("--uri={}", c.uri("fio"));
    let mut args = vec![
        "--name",
        name,
        "--ioengine=nbd",
        &uri,
        "--bs=4k",
        "--size=32m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
    ];
    args.extend_from_slice(extra);
    let o = run_tool("fio", &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("err= 0"), "{out}");
}

/// fio random writes with crc32c verification at QD1 and QD32; then the gateway is killed and
/// restarted — with `cairn up`'s layout, storage node 1 that runs it, so the host's gateway
/// and its replica die together — and a verify-only pass reads everything back; then every
/// block read from each of the 3 replicas directly is identical.
#[test]
fn fio_verify_across_a_gateway_restart_and_replicas_agree() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "fio", "--size", "64M"]);
    fio(
        &c,
        "qd1",
        &[
            "--rw=randwrite",
            "--iodepth=1",
            "--number_ios=1500",
            "--offset=0",
        ],
    );
    fio(
        &c,
        "qd32",
        &["--rw=randwrite", "--iodepth=32", "--offset=32m"],
    );

    // kill -9 the gateway, start it again with the command cairn up recorded.
    let (role, id) = c.gateway();
    c.kill(role, id);
    std::thread::sleep(Duration::from_millis(300));
    let gateway = c.respawn_gateway();
    fio(
        &c,
        "qd1",
        &[
            "--rw=randwrite",
            "--verify_only",
            "--offset=0",
            "--number_ios=1500",
        ],
    );
    fio(
        &c,
        "qd32",
        &["--rw=randwrite", "--verify_only", "--offset=32m"],
    );

    // Every replica holds the same bytes, and they are what a read through NBD returns.
    let through_nbd = c.path("nbd.raw");
    run_tool("nbdcopy", &[&c.uri("fio"), through_nbd.to_str().unwrap()]);
    let expected = std::fs::read(&through_nbd).unwrap();
    assert!(expected.iter().any(|&b| b != 0), "fio wrote something");
    let status: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap();
    let mut nodes = Vec::new();
    for node in status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
    {
        let out = c.path(&format!("replica-{node}.raw"));
        c.cairn(&[
            "debug",
            "read-replica",
            "fio",
            "0",
            "64M",
            "--node",
            &node.to_string(),
            "--out",
            out.to_str().unwrap(),
            // The gateway gives the lease back when its last client leaves, but maybe not
            // before this runs.
            "--force",
        ]);
        let copy = std::fs::read(&out).unwrap();
        assert!(copy == expected, "replica on node {node} differs");
        nodes.push(node);
    }
    assert_eq!(nodes.len(), 3);
    drop(gateway);
}

/// Descriptors a process has open.
fn open_fds(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Clients that write and go, one after another, leave nothing open behind them: the
/// gateway and the nodes end up with the descriptors they had after the first one. (Each
/// client's connections to the nodes on this host used to stay open on both ends, three in
/// the gateway and one in each node per client, until the gateway ran out of descriptors.)
#[test]
fn clients_that_come_and_go_leave_no_sockets_open() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "churn", "--size", "16M"]);
    let write = |i: usize| {
        run_tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {i} {}k 4k", i * 4),
                &c.uri("churn"),
            ],
        );
    };
    // Node 1 runs the gateway unless it runs apart.
    let mut processes = vec![("node", 1), ("node", 2), ("node", 3)];
    if c.gateway().0 == "nbd" {
        processes.push(("nbd", 1));
    }
    let pids: Vec<(String, u64)> = processes
        .into_iter()
        .map(|(role, id)| {
            let pid = c.process(role, id)["pid"].as_u64().expect("running");
            (format!("{role}{id}"), pid)
        })
        .collect();
    // The first client opens what stays open while the gateway runs (its metadata
    // connection, ...).
    write(1);
    let settle = || std::thread::sleep(Duration::from_secs(1));
    settle();
    let before: Vec<usize> = pids.iter().map(|(_, pid)| open_fds(*pid)).collect();
    const CLIENTS: usize = 12;
    for i in 2..2 + CLIENTS {
        write(i);
    }
    // A closed connection is torn down by the tasks that served it, soon after.
    let mut after = Vec::new();
    for _ in 0..20 {
        settle();
        after = pids.iter().map(|(_, pid)| open_fds(*pid)).collect();
        if after.iter().zip(&before).all(|(a, b)| a <= b) {
            break;
        }
    }
    for (((name, _), b), a) in pids.iter().zip(&before).zip(&after) {
        // A descriptor or two may be in passing (a client's socket not yet reaped);
        // one per client is a leak.
        assert!(
            *a < b + CLIENTS / 2,
            "{name} had {b} descriptors open after one client, {a} after {} more",
            CLIENTS
        );
    }
    // And what they wrote is there.
    let back = c.path("churn.raw");
    run_tool("nbdcopy", &[&c.uri("churn"), back.to_str().unwrap()]);
    let data = std::fs::read(&back).unwrap();
    for i in 1..2 + CLIENTS {
        assert!(
            data[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "client {i}'s write is not there"
        );
    }
}

/// Whether the kernel has a keepalive timer armed on the TCP connection from local port
/// `local` to remote port `remote` (/proc/net/tcp: the `tr` field is 2 exactly when the
/// socket's keepalive timer is pending).
fn keepalive_armed(local: u16, remote: u16) -> bool {
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .any(|f| port(f[1]) == local && port(f[2]) == remote && f[5].starts_with("02:"))
}

/// A TCP peer that goes silent (its host lost power: no FIN ever comes) is probed by the
/// gateway, the nodes and the metadata member, so its connection is reset within a minute or
/// so instead of holding a task, a descriptor and, in the gateway, the volume's lease for
/// good. Checked on the server's end of an NBD connection, of a data connection to each node
/// and of an API connection to the metadata member; and on the daemons' own connections to
/// the metadata member (they would otherwise keep calling a dead member until each call
/// timed out).
#[test]
fn silent_tcp_peers_are_probed() {
    let c = UpCluster::start();
    let status: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap();
    let mut servers: Vec<String> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["data_addr"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(servers.len(), 3, "{status}");
    servers.push(c.nbd.clone());
    servers.push(c.meta.clone());
    let clients: Vec<std::net::TcpStream> = servers
        .iter()
        .map(|a| std::net::TcpStream::connect(a.as_str()).unwrap())
        .collect();
    for (addr, client) in servers.iter().zip(&clients) {
        let (server_port, client_port) = (
            client.peer_addr().unwrap().port(),
            client.local_addr().unwrap().port(),
        );
        // The server sets its end up right after accepting it.
        let armed = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            keepalive_armed(server_port, client_port)
        });
        assert!(armed, "{addr}: no keepalive on the server's end");
        // And a client's own socket (this test's) has none: the check can tell.
        assert!(!keepalive_armed(client_port, server_port));
    }
    // The gateway's and the nodes' connections to the metadata member (each daemon reports
    // to it): every one established from a port other than this test's.
    let meta_port: u16 = c.meta.rsplit(':').next().unwrap().parse().unwrap();
    let ours = clients.last().unwrap().local_addr().unwrap().port();
    let theirs: Vec<u16> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[3] == "01")
        .filter_map(|f| {
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
            (port(f[2]) == meta_port && port(f[1]) != ours).then(|| port(f[1]))
        })
        .collect();
    assert!(
        theirs.len() >= 2,
        "no daemon is connected to the metadata member"
    );
    for port in theirs {
        assert!(
            keepalive_armed(port, meta_port),
            "the connection from port {port} to the metadata member has no keepalive"
        );
    }
}
