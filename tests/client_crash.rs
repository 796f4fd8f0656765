//! A client that dies in the middle of writes (the NBD gateway, run as a process of its own,
//! SIGKILL, under fio at QD32) can leave a block different on the members of its group. The
//! next attach — here the operator's `cairn debug read-replica --force` — fences the dead
//! holder and reconciles the chunks in the members' activity records before any I/O:
//! afterwards every replica is identical, and reads through a restarted gateway return the
//! same bytes.

mod common;

use std::time::Duration;

use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_proto::data as dpb;
use common::{run_tool, UpCluster};

const MIB: u64 = 1 << 20;

/// Each node's raw copy of the volume's first `len` bytes, read without attaching (no
/// generation: reads are allowed, nothing is reconciled).
fn raw_copies(c: &UpCluster, volume: u64, len: u64) -> Vec<Vec<u8>> {
    let status: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap();
    let addrs: Vec<String> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["data_addr"].as_str().unwrap().to_owned())
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut copies = Vec::new();
        for a in addrs {
            let dc = DataClient::connect(&a).await.unwrap();
            let mut copy = Vec::new();
            for chunk in 0..len / (4 * MIB) {
                let req = dpb::Request {
                    op: dpb::Op::Read as i32,
                    volume,
                    chunk,
                    offset: 0,
                    length: 4 * MIB,
                    ..Default::default()
                };
                let (r, d) = dc.call(req, Bytes::new()).await.unwrap();
                assert_eq!(r.status, dpb::Status::Ok as i32, "{}", r.message);
                copy.extend_from_slice(&d);
            }
            copies.push(copy);
        }
        copies
    })
}

fn differing_blocks(copies: &[Vec<u8>]) -> usize {
    (0..copies[0].len() / 4096)
        .filter(|b| {
            let r = b * 4096..(b + 1) * 4096;
            copies.iter().any(|c| c[r.clone()] != copies[0][r.clone()])
        })
        .count()
}

#[test]
fn a_gateway_killed_mid_write_leaves_no_replica_different_after_the_next_attach() {
    // The gateway alone dies: it runs apart from the storage nodes.
    let c = UpCluster::start_with(&["--gateway", "separate"]);
    c.cairn(&["volume", "create", "cc", "--size", "64M"]);
    let list: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["volume", "list", "--json"]).stdout).unwrap();
    let volume = list[0]["id"].as_u64().unwrap();

    // fio writes at QD32 until the gateway under it dies.
    let uri = format!("--uri={}", c.uri("cc"));
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=crash",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=64m",
            "--time_based",
            "--runtime=60",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("fio is needed ({e}); run scripts/setup"));
    std::thread::sleep(Duration::from_secs(3));
    c.kill("nbd", 1);
    let _ = fio.kill();
    let _ = fio.wait();

    // A kill rarely catches a write between its members (they are sent at once), so the test
    // also makes one: the dead holder's last write, delivered to one member only.
    let list: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["volume", "list", "--json"]).stdout).unwrap();
    let generation = list[0]["generation"].as_u64().unwrap();
    let status: serde_json::Value =
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap();
    let one = status["nodes"][0]["data_addr"].as_str().unwrap().to_owned();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let dc = DataClient::connect(&one).await.unwrap();
        let req = dpb::Request {
            op: dpb::Op::Write as i32,
            volume,
            chunk: 2,
            offset: 5 * 4096,
            length: 4096,
            generation,
            seq: u64::MAX,
            ..Default::default()
        };
        let (r, _) = dc.call(req, Bytes::from(vec![0xAB; 4096])).await.unwrap();
        assert_eq!(r.status, dpb::Status::Ok as i32, "{}", r.message);
    });
    let before = differing_blocks(&raw_copies(&c, volume, 64 * MIB));
    println!("blocks differing between replicas after the kill: {before}");
    assert!(before >= 1);

    // The next attach fences the dead holder and reconciles before any I/O.
    let out = c.path("after.raw");
    c.cairn(&[
        "debug",
        "read-replica",
        "cc",
        "0",
        "64M",
        "--node",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    let copies = raw_copies(&c, volume, 64 * MIB);
    assert_eq!(copies.len(), 3);
    assert_eq!(
        differing_blocks(&copies),
        0,
        "replicas differ after the attach ({before} differed before it)"
    );
    assert!(std::fs::read(&out).unwrap() == copies[0]);

    // A gateway started again serves the same bytes.
    let gateway = c.respawn_gateway();
    let through = c.path("through.raw");
    run_tool("nbdcopy", &[&c.uri("cc"), through.to_str().unwrap()]);
    assert!(std::fs::read(&through).unwrap() == copies[0]);
    drop(gateway);
}
