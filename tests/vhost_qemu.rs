//! A real QEMU guest on a Cairn volume over vhost-user-blk: a stock Debian kernel and a busybox
//! initramfs boot under TCG with the volume as `vhost-user-blk-pci` (memfd guest memory). The
//! guest writes a pseudo-random pattern with O_DIRECT, syncs, reads it back and compares, and
//! discards a range; a second, fresh guest finds the same pattern (persistence) and the range
//! still zeros; a third guest pauses while the backend process is stopped and started again,
//! and its next writes go through the reconnected device (QEMU's `reconnect=`); a fourth
//! guest keeps 12 writers busy while the backend is killed with SIGKILL and restarted three
//! times, and sees neither an error nor a lost write (the inflight region QEMU keeps); then
//! the host reads the same bytes through NBD.
//!
//! Needs qemu-system-x86_64 and the guest kit (kernel, modules, busybox) that scripts/setup
//! puts in ~/.cache/cairn-guest; without them the test fails and says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_tool, UpCluster};

const MIB: usize = 1 << 20;
const MODULES: [&str; 6] = [
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for round in 1 2 3; do
  for m in /lib/modules/*.ko; do insmod $m 2>/dev/null; done
done
for i in $(seq 1 200); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo CAIRN-FAIL no-disk; poweroff -f; }
echo CAIRN-DISK $(cat /sys/block/vda/size) sectors, logical $(cat /sys/block/vda/queue/logical_block_size)
mode=$(sed -n 's/.*cairn_mode=\([a-z]*\).*/\1/p' /proc/cmdline)
dd if=/dev/zero of=/tmp/zeros bs=4096 count=64 2>/dev/null
if [ "$mode" = write ]; then
  dd if=/pattern.bin of=/dev/vda bs=4096 seek=256 oflag=direct conv=fsync 2>/dev/null || echo CAIRN-FAIL write
  dd if=/pattern.bin of=/dev/vda bs=4096 seek=1024 count=64 oflag=direct conv=fsync 2>/dev/null || echo CAIRN-FAIL write2
  sync
  dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=256 iflag=direct 2>/dev/null
  cmp /pattern.bin /tmp/back && echo CAIRN-WRITE-OK
  blkdiscard -o 4194304 -l 262144 /dev/vda || echo CAIRN-FAIL discard
  dd if=/dev/vda of=/tmp/d bs=4096 skip=1024 count=64 iflag=direct 2>/dev/null
  cmp /tmp/zeros /tmp/d && echo CAIRN-DISCARD-OK
elif [ "$mode" = reconnect ]; then
  echo CAIRN-PAUSE
  sleep 15
  dd if=/pattern.bin of=/dev/vda bs=4096 seek=2048 oflag=direct conv=fsync 2>/dev/null || echo CAIRN-FAIL reconnect-write
  dd if=/dev/vda of=/tmp/back bs=4096 skip=2048 count=256 iflag=direct 2>/dev/null
  cmp /pattern.bin /tmp/back && echo CAIRN-RECONNECT-OK
elif [ "$mode" = storm ]; then
  # 12 writers, 4 passes each over a region of their own, each pass different data (the
  # pattern from block p on), and 4 readers of the first guest's pattern meanwhile: reads
  # (one replica) overtake writes (three), so requests complete out of order on each queue.
  # The host kills the backend with SIGKILL during this.
  echo CAIRN-STORM
  dd if=/pattern.bin of=/tmp/wantr bs=4096 count=64 2>/dev/null
  for r in 0 1 2 3; do
    (
      while [ ! -e /tmp/stop ]; do
        dd if=/dev/vda of=/tmp/r$r bs=4096 skip=256 count=64 iflag=direct 2>/dev/null || echo CAIRN-FAIL storm-read-$r
        cmp /tmp/wantr /tmp/r$r >/dev/null || echo CAIRN-FAIL storm-read-data-$r
      done
    ) &
  done
  writers=""
  for w in 0 1 2 3 4 5 6 7 8 9 10 11; do
    (
      p=0
      while [ $p -lt 4 ]; do
        dd if=/pattern.bin of=/dev/vda bs=4096 skip=$p count=96 seek=$(( 6144 + w * 128 )) oflag=direct 2>/dev/null || echo CAIRN-FAIL storm-write-$w-$p
        p=$((p+1))
      done
      dd if=/pattern.bin of=/tmp/want$w bs=4096 skip=3 count=96 2>/dev/null
      dd if=/dev/vda of=/tmp/got$w bs=4096 skip=$(( 6144 + w * 128 )) count=96 iflag=direct 2>/dev/null
      cmp /tmp/want$w /tmp/got$w && echo CAIRN-STORM-OK-$w
    ) &
    writers="$writers $!"
  done
  wait $writers
  touch /tmp/stop
  wait
  echo CAIRN-STORM-END
  dmesg | grep -i -e "not a head" -e "I/O error" -e "blk_update_request" -e "broken" && echo CAIRN-FAIL guest-kernel-errors
else
  dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=256 iflag=direct 2>/dev/null
  cmp /pattern.bin /tmp/back && echo CAIRN-VERIFY-OK
  dd if=/dev/vda of=/tmp/d bs=4096 skip=1024 count=64 iflag=direct 2>/dev/null
  cmp /tmp/zeros /tmp/d && echo CAIRN-DISCARD-OK
fi
echo CAIRN-DONE
poweroff -f
"#;

fn guest_kit() -> PathBuf {
    let root = std::env::var("CAIRN_GUEST_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cairn-guest/root")
        });
    assert!(
        root.join("bin/busybox").exists(),
        "no guest kit at {} (kernel, modules, busybox): run scripts/setup",
        root.display()
    );
    root
}

/// A cpio archive in the kernel's "newc" format.
struct Cpio(Vec<u8>, u32);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.1 += 1;
        let fields = [
            self.1,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            self.0.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
}

fn initramfs(kit: &Path, pattern: &[u8], out: &Path) {
    let mut c = Cpio(Vec::new(), 0);
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        c.entry(d, 0o040755, (0, 0), &[]);
    }
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.entry("init", 0o100755, (0, 0), INIT.as_bytes());
    c.entry(
        "bin/busybox",
        0o100755,
        (0, 0),
        &std::fs::read(kit.join("bin/busybox")).unwrap(),
    );
    let modules = std::fs::read_dir(kit.join("lib/modules"))
        .unwrap()
        .next()
        .expect("kernel modules in the guest kit")
        .unwrap()
        .path()
        .join("kernel");
    for (i, m) in MODULES.iter().enumerate() {
        let name = format!(
            "lib/modules/{i}-{}",
            Path::new(m).file_name().unwrap().to_str().unwrap()
        );
        c.entry(
            &name,
            0o100644,
            (0, 0),
            &std::fs::read(modules.join(m)).unwrap(),
        );
    }
    c.entry("pattern.bin", 0o100644, (0, 0), pattern);
    c.entry("TRAILER!!!", 0, (0, 0), &[]);
    std::fs::write(out, &c.0).unwrap();
}

fn kernel(kit: &Path) -> PathBuf {
    std::fs::read_dir(kit.join("boot"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("vmlinuz-")
        })
        .expect("a kernel in the guest kit")
}

/// Boots a guest in `mode`, returns what it printed. `on_cue` runs once, when the guest
/// prints CAIRN-PAUSE or CAIRN-STORM.
fn boot(kit: &Path, initrd: &Path, socket: &Path, mode: &str, mut on_cue: impl FnMut()) -> String {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel(kit))
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            &format!("console=ttyS0 panic=-1 loglevel=3 cairn_mode={mode}"),
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
        ])
        .arg(format!(
            "socket,id=vol,path={},reconnect=1",
            socket.display()
        ))
        .args(["-device", "vhost-user-blk-pci,chardev=vol,num-queues=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("qemu-system-x86_64 is needed ({e}); run scripts/setup"));
    // The console, line by line, as the guest prints it.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let pipes: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(qemu.stdout.take().unwrap()),
        Box::new(qemu.stderr.take().unwrap()),
    ];
    for pipe in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(pipe);
            let mut line = Vec::new();
            while std::io::BufRead::read_until(&mut r, b'\n', &mut line).unwrap_or(0) > 0 {
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                line.clear();
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut text = String::new();
    let mut paused = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if !paused && (line.contains("CAIRN-PAUSE") || line.contains("CAIRN-STORM")) {
                    paused = true;
                    on_cue();
                }
                text.push_str(&line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
        }
    }
    let _ = qemu.wait();
    assert!(
        text.contains("CAIRN-DONE"),
        "the guest did not finish:\n{text}\n{}",
        backend_logs(socket)
    );
    assert!(!text.contains("CAIRN-FAIL"), "the guest failed:\n{text}");
    text
}

/// The last lines of every backend's log (kept beside the socket), for a failure's message:
/// the cluster's directory is gone once the test has failed.
fn backend_logs(socket: &Path) -> String {
    let mut out = String::new();
    let dir = socket
        .parent()
        .expect("the socket is in the cluster's directory");
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("backend-") {
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            out.push_str(&format!("--- {name} (last 30 lines)\n{tail}\n"));
        }
    }
    out
}

/// Starts `cairn vhost serve` for the test volume and waits for its socket. Its log goes to
/// `backend-<pid>.log` in the cluster's directory.
fn start_backend(c: &UpCluster, socket: &Path) -> KillOnDrop {
    let _ = std::fs::remove_file(socket);
    let log = tempfile::NamedTempFile::new_in(c.path(".")).unwrap();
    let child = Command::new(common::CAIRN)
        .args(["--meta", &c.meta, "vhost", "serve", "--volume", "guest"])
        .args(["--queues", "2", "--socket"])
        .arg(socket)
        .env("CAIRN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let _ = log.persist(c.path(&format!("backend-{}.log", child.id())));
    let b = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the backend did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    b
}

/// SIGTERM, as an operator's restart does: the backend gives its lease back and exits 0.
fn stop_backend(mut b: KillOnDrop) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(b.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(b.0.wait().unwrap().success());
}

/// The backend process, killed if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_qemu_guest_writes_reads_and_discards_on_a_cairn_volume() {
    let kit = guest_kit();
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "guest", "--size", "64M"]);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let pattern: Vec<u8> = (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let initrd = c.path("initrd.cpio");
    initramfs(&kit, &pattern, &initrd);
    let socket = c.path("guest.sock");
    let backend = std::cell::RefCell::new(Some(start_backend(&c, &socket)));

    let first = boot(&kit, &initrd, &socket, "write", || {});
    assert!(first.contains("CAIRN-WRITE-OK"), "{first}");
    assert!(first.contains("CAIRN-DISCARD-OK"), "{first}");
    assert!(
        first.contains("CAIRN-DISK 131072 sectors, logical 4096"),
        "capacity and block size reach the guest: {first}"
    );
    let second = boot(&kit, &initrd, &socket, "verify", || {});
    assert!(second.contains("CAIRN-VERIFY-OK"), "{second}");
    assert!(second.contains("CAIRN-DISCARD-OK"), "{second}");
    // The backend is restarted while a guest is attached (and idle): the guest's next I/O
    // goes through the reconnected device, without an error.
    let third = boot(&kit, &initrd, &socket, "reconnect", || {
        stop_backend(backend.borrow_mut().take().unwrap());
        *backend.borrow_mut() = Some(start_backend(&c, &socket));
    });
    assert!(third.contains("CAIRN-RECONNECT-OK"), "{third}");

    // The backend is killed (SIGKILL) three times while 12 writers in the guest keep
    // requests in flight on both queues; each time a new backend starts on the same socket,
    // QEMU reconnects and hands it the inflight region. The guest sees no error, every
    // writer's last pass is what the disk holds, and the kernel reports nothing.
    let fourth = boot(&kit, &initrd, &socket, "storm", || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1500));
            let mut b = backend.borrow_mut().take().unwrap();
            b.0.kill().unwrap();
            b.0.wait().unwrap();
            *backend.borrow_mut() = Some(start_backend(&c, &socket));
        }
    });
    for w in 0..12 {
        assert!(fourth.contains(&format!("CAIRN-STORM-OK-{w}")), "{fourth}");
    }
    // Each restarted backend logs the requests it found in flight: at least one kill must
    // have landed in the middle of I/O, or the test proved nothing.
    let mut logs = String::new();
    for e in std::fs::read_dir(c.path(".")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("backend-") {
            logs.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    assert!(
        logs.contains("running again the requests a previous backend left in flight"),
        "no restarted backend found requests in flight: the kills missed the I/O\n{logs}\n{fourth}"
    );

    // The backend gives its lease back on SIGTERM; then the host reads through NBD.
    stop_backend(backend.borrow_mut().take().unwrap());
    let out = c.path("guest.raw");
    run_tool("nbdcopy", &[&c.uri("guest"), out.to_str().unwrap()]);
    let disk = std::fs::read(&out).unwrap();
    assert!(
        disk[MIB..2 * MIB] == pattern[..],
        "the guest's pattern, through NBD"
    );
    assert!(disk[4 * MIB..4 * MIB + 256 * 1024].iter().all(|&b| b == 0));
    assert!(
        disk[8 * MIB..9 * MIB] == pattern[..],
        "the write after the reconnect"
    );
}
