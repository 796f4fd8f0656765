//! The NBD gateway under bad input, with a hand-rolled client speaking raw bytes: every case
//! gets the answer doc/proto.md prescribes (an option error, an errno, or a closed connection
//! for a garbage handshake or request header), and a bystander connection keeps working.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cairn_client::nbd::proto::*;
use common::UpCluster;

struct Conn(TcpStream);

impl Conn {
    /// Connects and does the fixed-newstyle greeting (client flags: fixed newstyle, no zeroes).
    fn open(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Conn(s);
        let g = c.read(18);
        assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        c
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (type, data).
    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (kind, self.read(len))
    }

    /// NBD_OPT_GO for `name`: the final reply type (ACK, or the error).
    fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (kind, _) = self.reply(OPT_GO);
            if kind != REP_INFO {
                return kind;
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// A simple reply: (cookie, error).
    fn simple(&mut self) -> (u64, u32) {
        let h = self.read(16);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
        )
    }

    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }

    fn start(addr: &str) -> Self {
        let mut c = Self::open(addr);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }
}

#[test]
fn bad_input_gets_protocol_errors_and_the_gateway_keeps_serving() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "vol", "--size", "16M"]);
    const SIZE: u64 = 16 << 20;

    // A bystander in transmission before anything bad happens.
    let mut by = Conn::start(&c.nbd);
    assert_eq!(by.go("vol"), REP_ACK);
    by.request(CMD_WRITE, 0, 1, 0, 4096, &[0x42; 4096]);
    assert_eq!(by.simple(), (1, 0));

    // Garbage handshakes: a client that is not fixed-newstyle, unknown client flags, a bad
    // option magic — each connection is closed.
    let mut g = Conn::open(&c.nbd);
    g.send(&0u32.to_be_bytes());
    assert!(g.closed(), "old-style client");
    let mut g = Conn::open(&c.nbd);
    g.send(&0x8000_0001u32.to_be_bytes());
    assert!(g.closed(), "unknown client flags");
    let mut g = Conn::start(&c.nbd);
    g.send(b"garbage garbage garbage!");
    assert!(g.closed(), "bad option magic");

    // Option errors keep the connection in option haggling.
    let mut o = Conn::start(&c.nbd);
    assert_eq!(o.go("no-such-volume"), REP_ERR_UNKNOWN);
    o.option(99, b"");
    assert_eq!(o.reply(99).0, REP_ERR_UNSUP);
    o.option(OPT_GO, b"\x00\x00\x10\x00short");
    assert_eq!(o.reply(OPT_GO).0, REP_ERR_INVALID, "malformed GO");
    o.option(OPT_SET_META_CONTEXT, b"");
    assert_eq!(
        o.reply(OPT_SET_META_CONTEXT).0,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    o.option(OPT_LIST, b"x");
    assert_eq!(o.reply(OPT_LIST).0, REP_ERR_INVALID, "LIST with data");
    o.option(OPT_ABORT, b"");
    assert_eq!(o.reply(OPT_ABORT).0, REP_ACK);
    assert!(o.closed());

    // Bad requests: each gets its errno; the connection stays up.
    let mut t = Conn::start(&c.nbd);
    assert_eq!(t.go("vol"), REP_ACK);
    t.request(CMD_READ, 0, 10, SIZE, 4096, &[]);
    assert_eq!(t.simple(), (10, EINVAL), "read past the end");
    t.request(CMD_READ, 0, 11, 100, 4096, &[]);
    assert_eq!(t.simple(), (11, EINVAL), "unaligned read");
    t.request(CMD_READ, 0, 12, 0, 64 << 20, &[]);
    assert_eq!(t.simple(), (12, EINVAL), "read over the maximum");
    t.request(42, 0, 13, 0, 4096, &[]);
    assert_eq!(t.simple(), (13, EINVAL), "unknown command");
    t.request(CMD_WRITE, 0, 14, SIZE, 4096, &[7; 4096]);
    assert_eq!(t.simple(), (14, ENOSPC), "write past the end");
    t.request(CMD_WRITE, 1 << 9, 15, 0, 4096, &[7; 4096]);
    assert_eq!(t.simple(), (15, EINVAL), "unknown flag");
    t.request(CMD_WRITE, 0, 16, 0, 40 << 20, &vec![9u8; 40 << 20]);
    assert_eq!(
        t.simple(),
        (16, EINVAL),
        "write over the maximum (payload skipped)"
    );
    t.request(CMD_BLOCK_STATUS, 0, 17, 0, 4096, &[]);
    assert_eq!(t.simple(), (17, EINVAL), "block status not negotiated");
    t.request(CMD_TRIM, 0, 18, SIZE - 4096, 8192, &[]);
    assert_eq!(t.simple(), (18, ENOSPC), "trim past the end");
    // And good ones still work on the same connection, pipelined.
    t.request(CMD_WRITE, CMD_FLAG_FUA, 19, 8192, 4096, &[0x55; 4096]);
    t.request(CMD_FLUSH, 0, 20, 0, 0, &[]);
    let mut got = [t.simple(), t.simple()];
    got.sort();
    assert_eq!(got, [(19, 0), (20, 0)]);
    t.request(CMD_READ, 0, 21, 8192, 4096, &[]);
    assert_eq!(t.simple(), (21, 0));
    assert_eq!(t.read(4096), vec![0x55; 4096]);
    // A garbage request header ends this connection.
    t.send(&[0xEE; 28]);
    assert!(t.closed(), "bad request magic");

    // The bystander never noticed.
    by.request(CMD_READ, 0, 2, 0, 4096, &[]);
    assert_eq!(by.simple(), (2, 0));
    assert_eq!(by.read(4096), vec![0x42; 4096]);
    by.request(CMD_DISC, 0, 3, 0, 0, &[]);
    assert!(by.closed());
}
