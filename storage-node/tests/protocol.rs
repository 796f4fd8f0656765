//! The data-protocol server on 127.0.0.1 over the io_uring disk engine: round trips,
//! pipelining, fencing, corruption reporting, and malformed input; over TCP, the Unix socket
//! for this host, and in-process calls from the node's own process.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use cairn_client::data::client::{ClientError, DataClient};
use cairn_client::data::inproc::{self, RegisterError, Registration};
use cairn_proto::data as pb;
use cairn_storage_node::activity::Activity;
use cairn_storage_node::engine::disk::DiskEngine;
use cairn_storage_node::engine::{ChunkEngine, ChunkId, CHUNK_SIZE};
use cairn_storage_node::fence::Fence;
use cairn_storage_node::protocol::server::{DataServer, InProcess, ServerStats};
use cairn_storage_node::resync::{Dirty, Gates, Syncing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Node {
    addr: String,
    server: Arc<DataServer<DiskEngine>>,
    disk: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A node serving its TCP address and, like a daemon, its Unix socket for this host.
async fn node() -> Node {
    node_with(true).await
}

async fn node_with(local_socket: bool) -> Node {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let disk = dir.path().join("disk");
    DiskEngine::create_file(&disk, DiskEngine::file_size_for(8)).unwrap();
    let engine = DiskEngine::open(&disk, &dir.path().join("index"))
        .await
        .unwrap();
    let server = Arc::new(DataServer {
        node_uuid: engine.uuid(),
        disks: [(engine.uuid(), Arc::new(engine))].into_iter().collect(),
        fence: Arc::new(Fence::open(&dir.path().join("fence")).unwrap()),
        stats: Arc::new(ServerStats::default()),
        dirty: Arc::new(Dirty::open(&dir.path().join("dirty")).unwrap()),
        suspect: Arc::new(Dirty::open(&dir.path().join("suspect")).unwrap()),
        activity: Arc::new(Activity::open(&dir.path().join("activity")).unwrap()),
        gates: Gates::default(),
        syncing: Syncing::default(),
        ready: AtomicBool::new(true),
        latency: Default::default(),
        scrub: Default::default(),
        progress: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let local = local_socket.then(|| {
        tokio::net::UnixListener::bind(cairn_client::data::local_socket_name(&addr)).unwrap()
    });
    tokio::spawn(
        server
            .clone()
            .serve(listener, local, std::future::pending()),
    );
    Node {
        addr,
        server,
        disk,
        _dir: dir,
    }
}

fn req(op: pb::Op, chunk: u64, offset: u64, length: u64, generation: u64) -> pb::Request {
    pb::Request {
        op: op as i32,
        volume: 1,
        chunk,
        offset,
        length,
        generation,
        group: 1,
        epoch: 1,
        ..Default::default()
    }
}

fn status(r: &pb::Response) -> pb::Status {
    pb::Status::try_from(r.status).unwrap()
}

/// Every op round-trips over TCP, and 64 pipelined writes on one connection all land.
/// A client on the node's host reaches it over its Unix socket; every op works there as over
/// TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_and_pipelining_over_the_local_socket() {
    let n = node().await;
    let c = DataClient::connect(&n.addr).await.unwrap();
    assert!(
        c.local,
        "a node on this host is reached over its Unix socket"
    );
    round_trip_and_pipelining(&n, Arc::new(c)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_and_pipelining_over_tcp() {
    let n = node().await;
    let c = DataClient::connect_tcp(&n.addr).await.unwrap();
    assert!(!c.local);
    round_trip_and_pipelining(&n, Arc::new(c)).await;
}

/// Registers the node for clients of this process, under its address.
fn in_process(n: &Node) -> Registration {
    inproc::register(&n.addr, Arc::new(InProcess(n.server.clone()))).unwrap()
}

/// A client in the node's own process calls it directly: every op, pipelining, the answers
/// to bad requests and fencing are as over a socket, and each call is counted as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_bad_requests_and_fencing_in_process() {
    let n = node().await;
    let _registered = in_process(&n);
    let again = inproc::register(&n.addr, Arc::new(InProcess(n.server.clone())));
    assert!(
        matches!(again, Err(RegisterError::Taken(_))),
        "one node per address"
    );
    let c = Arc::new(DataClient::connect(&n.addr).await.unwrap());
    assert!(
        c.in_process && !c.local,
        "called in-process, not over a socket"
    );
    let requests = || n.server.stats.requests.load(Ordering::Relaxed);
    bad_requests_are_answered(&c).await;
    assert_eq!(requests(), 5);
    assert_eq!(n.server.stats.refused.load(Ordering::Relaxed), 5);
    round_trip_and_pipelining(&n, c.clone()).await;
    fencing(&n, &c).await;
    assert!(requests() > 5 + 64);
}

/// A node's registration dropped (the node stopping): its in-process clients' calls fail as
/// on a closed connection, and a new client reaches it over its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_node_is_reached_over_its_socket() {
    let n = node().await;
    let registered = in_process(&n);
    let c = DataClient::connect(&n.addr).await.unwrap();
    assert!(c.in_process);
    assert_served(&c).await;
    drop(registered);
    assert!(matches!(
        c.call(req(pb::Op::Flush, 0, 0, 0, 1), Bytes::new()).await,
        Err(ClientError::Closed)
    ));
    let c = DataClient::connect(&n.addr).await.unwrap();
    assert!(!c.in_process && c.local);
    assert_served(&c).await;
}

/// In-process calls run on the node's runtime, whichever runtime the caller is on: a node on
/// the daemons' current-thread runtime, whose io_uring ring takes submissions from that
/// thread only (SINGLE_ISSUER), serves 32 concurrent writes, then their reads, made from the
/// worker threads of another runtime. Run on the caller's threads instead, the reads'
/// submissions are refused by the kernel and, with the ring's backstop set to an hour, never
/// complete: the 60 s bound fails the test.
#[cfg(feature = "failpoints")]
#[test]
fn in_process_calls_run_on_the_nodes_runtime() {
    fail::cfg("uring-backstop-hour", "return").unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let node_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let n = node().await;
            let disk = n.server.disk(&n.server.node_uuid).unwrap();
            assert!(disk.uses_uring(), "io_uring is what this test is about");
            let _registered = in_process(&n);
            addr_tx.send(n.addr.clone()).unwrap();
            let _ = stop_rx.await;
        });
    });
    let addr = addr_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let at = |i: u64| (i % 4, (i / 4) * 4096);
    let all = async {
        let c = Arc::new(DataClient::connect(&addr).await.unwrap());
        assert!(c.in_process);
        let each = |read: bool| {
            let c = c.clone();
            (0..32u64).map(move |i| {
                let c = c.clone();
                tokio::spawn(async move {
                    let (chunk, offset) = at(i);
                    let (r, p) = match read {
                        false => {
                            let d = Bytes::from(vec![i as u8 + 1; 4096]);
                            c.call(req(pb::Op::Write, chunk, offset, 4096, 1), d).await
                        }
                        true => {
                            let r = req(pb::Op::Read, chunk, offset, 4096, 1);
                            c.call(r, Bytes::new()).await
                        }
                    }
                    .unwrap();
                    assert_eq!(status(&r), pb::Status::Ok, "{r:?}");
                    assert!(!read || p.iter().all(|&b| b == i as u8 + 1), "write {i}");
                })
            })
        };
        for t in each(false).collect::<Vec<_>>() {
            t.await.unwrap();
        }
        for t in each(true).collect::<Vec<_>>() {
            t.await.unwrap();
        }
    };
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("in-process reads never completed")
    });
    fail::remove("uring-backstop-hour");
    stop_tx.send(()).unwrap();
    node_thread.join().unwrap();
}

/// Without the node's Unix socket (a node elsewhere, or one that could not bind it), a client
/// connects over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_local_socket_the_client_uses_tcp() {
    let n = node_with(false).await;
    let c = DataClient::connect(&n.addr).await.unwrap();
    assert!(!c.local);
    assert_served(&c).await;
}

/// The connection works: a flush is answered.
async fn assert_served(c: &DataClient) {
    let (r, _) = c
        .call(req(pb::Op::Flush, 0, 0, 0, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok);
}

/// A process of another user holding the node's local socket name (taken before the node
/// started) does not get the node's local clients: they use TCP. Needs root, to run the
/// squatter as `nobody`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_socket_of_another_user_is_not_used() {
    use std::os::unix::process::CommandExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs a process as another user: run the suite as root (as CI does)"
    );
    let n = node_with(false).await;
    let name = cairn_client::data::local_socket_name(&n.addr);
    // Binds the name and accepts whatever comes, answering nothing.
    let script = format!(
        "import socket, sys\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.bind({:?})\n\
         s.listen(8)\n\
         print('bound', flush=True)\n\
         conns = []\n\
         while True:\n    conns.append(s.accept())\n",
        name
    );
    /// Killed however the test ends.
    struct Squatter(std::process::Child);
    impl Drop for Squatter {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut squatter = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map(Squatter)
        .expect("python3 (Debian's /usr/bin/python3)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "bound", "the squatter could not bind the name");
    let c = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        DataClient::connect(&n.addr),
    )
    .await
    .expect("connected to the squatter, which never answers")
    .unwrap();
    drop(squatter);
    assert!(!c.local, "used a socket held by another user");
    assert_served(&c).await;
}

async fn round_trip_and_pipelining(n: &Node, c: Arc<DataClient>) {
    assert_eq!(c.node_uuid, n.server.node_uuid);
    let data = Bytes::from(vec![0xC4u8; 8192]);
    let (r, _) = c
        .call(req(pb::Op::Write, 0, 4096, 8192, 1), data.clone())
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok, "{r:?}");
    let (r, p) = c
        .call(req(pb::Op::Read, 0, 4096, 8192, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!((status(&r), p.clone()), (pb::Status::Ok, data));
    assert_eq!(r.payload_crc, crc32c::crc32c(&p));
    let (r, _) = c
        .call(req(pb::Op::ChunkInfo, 0, 0, 0, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.mapped[0], 0b110);
    let (r, p) = c
        .call(req(pb::Op::ChunkCopy, 0, 0, 0, 0), Bytes::new())
        .await
        .unwrap();
    assert_eq!((status(&r), p.len() as u64), (pb::Status::Ok, CHUNK_SIZE));
    let (r, _) = c
        .call(req(pb::Op::Discard, 0, 4096, 4096, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok);
    let (r, _) = c
        .call(req(pb::Op::Flush, 0, 0, 0, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok);

    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let d = Bytes::from(vec![i as u8; 4096]);
            let (r, _) = c
                .call(req(pb::Op::Write, 1 + i % 4, (i / 4) * 4096, 4096, 1), d)
                .await
                .unwrap();
            assert_eq!(status(&r), pb::Status::Ok);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..64u64 {
        let (_, p) = c
            .call(
                req(pb::Op::Read, 1 + i % 4, (i / 4) * 4096, 4096, 1),
                Bytes::new(),
            )
            .await
            .unwrap();
        assert!(p.iter().all(|&b| b == i as u8), "write {i}");
    }
}

/// DESIGN.md §5.3: once a newer generation has written, the older one is refused on every
/// op that changes data, and its reads are refused too; a newer epoch fences older ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_by_generation_and_epoch() {
    let n = node().await;
    let c = DataClient::connect(&n.addr).await.unwrap();
    fencing(&n, &c).await;
}

async fn fencing(n: &Node, c: &DataClient) {
    let w = |generation, epoch| {
        let mut r = req(pb::Op::Write, 0, 0, 4096, generation);
        r.epoch = epoch;
        r
    };
    let d = || Bytes::from(vec![1u8; 4096]);
    assert_eq!(
        status(&c.call(w(5, 1), d()).await.unwrap().0),
        pb::Status::Ok
    );
    assert_eq!(
        status(&c.call(w(6, 1), d()).await.unwrap().0),
        pb::Status::Ok
    );
    let (r, _) = c.call(w(5, 1), d()).await.unwrap();
    assert_eq!(status(&r), pb::Status::Fenced);
    assert!(r.message.contains("older than 6"), "{}", r.message);
    assert_eq!(
        status(
            &c.call(req(pb::Op::Discard, 0, 0, 4096, 5), Bytes::new())
                .await
                .unwrap()
                .0
        ),
        pb::Status::Fenced
    );
    assert_eq!(
        status(
            &c.call(req(pb::Op::Read, 0, 0, 4096, 5), Bytes::new())
                .await
                .unwrap()
                .0
        ),
        pb::Status::Fenced
    );
    assert_eq!(
        status(&c.call(w(6, 3), d()).await.unwrap().0),
        pb::Status::Ok
    );
    assert_eq!(
        status(&c.call(w(6, 2), d()).await.unwrap().0),
        pb::Status::StaleEpoch,
        "an older epoch: the group's membership changed"
    );
    assert_eq!(
        status(&c.call(w(0, 3), d()).await.unwrap().0),
        pb::Status::Fenced,
        "a write needs a generation"
    );
    assert!(
        n.server
            .stats
            .fenced
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

/// A byte flipped in the disk file behind the node's back: the read fails with CORRUPT naming
/// the block, is counted, and no data is returned; other blocks still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_reported_over_the_wire() {
    let n = node().await;
    let c = DataClient::connect(&n.addr).await.unwrap();
    let (r, _) = c
        .call(
            req(pb::Op::Write, 2, 0, 4 * 4096, 1),
            Bytes::from(vec![3u8; 4 * 4096]),
        )
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok);
    let disk = n.server.disk(&n.server.node_uuid).unwrap();
    // The in-place copy of the write may still be on its way; damage it once it has landed.
    disk.settle().await;
    let at = disk
        .disk_offset(
            ChunkId {
                volume: 1,
                index: 2,
            },
            2 * 4096,
        )
        .unwrap()
        + 99;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&n.disk)
        .unwrap();
    f.write_all_at(&[0xEE], at).unwrap();
    f.sync_all().unwrap();
    let (r, p) = c
        .call(req(pb::Op::Read, 2, 0, 4 * 4096, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!((status(&r), r.block, p.len()), (pb::Status::Corrupt, 2, 0));
    assert!(r.message.contains("chunk 1/2 block 2"), "{}", r.message);
    assert_eq!(
        n.server
            .disk(&n.server.node_uuid)
            .unwrap()
            .stats()
            .corrupt_reads,
        1
    );
    let (r, _) = c
        .call(req(pb::Op::Read, 2, 0, 4096, 1), Bytes::new())
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok);
}

/// Malformed input: bad requests get error responses on a connection that keeps working;
/// undecodable or oversized frames and bad handshakes close only their own connection; a
/// bystander connection is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input() {
    let n = node().await;
    let bystander = DataClient::connect(&n.addr).await.unwrap();
    let c = DataClient::connect(&n.addr).await.unwrap();
    bad_requests_are_answered(&c).await;
    // An undecodable header: no id to answer, so the connection closes.
    c.send_raw(Bytes::from_static(b"\xff\xff\xff\xff"), Bytes::new())
        .await
        .unwrap();
    assert!(matches!(
        c.call(req(pb::Op::Flush, 0, 0, 0, 1), Bytes::new()).await,
        Err(ClientError::Closed)
    ));

    // An oversized frame prefix, raw on a socket after a good handshake.
    let mut s = tokio::net::TcpStream::connect(&n.addr).await.unwrap();
    s.write_all(b"\x00\x00\x00\x00\x00\x00\x00\x00")
        .await
        .unwrap(); // empty header: refused
    let mut buf = vec![0u8; 256];
    let got = s.read(&mut buf).await.unwrap();
    assert!(got > 0, "a Welcome refusing the handshake");
    assert!(String::from_utf8_lossy(&buf[..got]).contains("expected a Hello"));
    // Wrong protocol version.
    let hello = pb::Hello {
        magic: "cairn-data".into(),
        protocol_version: 99,
        ..Default::default()
    };
    let mut s = tokio::net::TcpStream::connect(&n.addr).await.unwrap();
    let h = prost::Message::encode_to_vec(&hello);
    let mut f = BytesMut::new();
    f.put_u32_le(h.len() as u32);
    f.put_u32_le(0);
    f.extend_from_slice(&h);
    s.write_all(&f).await.unwrap();
    let got = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..got]).contains("protocol version 99 unsupported"));
    // Garbage, then a giant length prefix.
    let mut s = tokio::net::TcpStream::connect(&n.addr).await.unwrap();
    s.write_all(b"\x01\x00\x00\x00\xff\xff\xff\xffGARBAGE")
        .await
        .unwrap();
    drop(s);

    let (r, _) = bystander
        .call(
            req(pb::Op::Write, 0, 0, 4096, 1),
            Bytes::from(vec![9u8; 4096]),
        )
        .await
        .unwrap();
    assert_eq!(status(&r), pb::Status::Ok, "the bystander is still served");
    assert!(
        n.server
            .stats
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
}

/// Requests that decode but are wrong get their error answered, and the client goes on.
async fn bad_requests_are_answered(c: &DataClient) {
    for (r, p, want) in [
        (
            req(pb::Op::Read, 0, 100, 4096, 1),
            Bytes::new(),
            pb::Status::Invalid,
        ),
        (
            req(pb::Op::Read, 0, CHUNK_SIZE - 4096, 8192, 1),
            Bytes::new(),
            pb::Status::Invalid,
        ),
        (
            req(pb::Op::Write, 0, 0, 4096, 1),
            Bytes::from(vec![0u8; 100]),
            pb::Status::Invalid,
        ),
        (
            pb::Request {
                op: 42,
                ..req(pb::Op::Read, 0, 0, 4096, 1)
            },
            Bytes::new(),
            pb::Status::Unsupported,
        ),
        (
            req(pb::Op::Unspecified, 0, 0, 4096, 1),
            Bytes::new(),
            pb::Status::Unsupported,
        ),
    ] {
        let (resp, _) = c.call(r, p).await.unwrap();
        assert_eq!(status(&resp), want, "{resp:?}");
    }
}
