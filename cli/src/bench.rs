//! `cairn bench VOLUME`: a standard set of fio-like jobs against a volume through the client
//! library — what the volume gives a VM on this host, without NBD or a kernel in the way —
//! with a progress bar and a report: IOPS, bandwidth and latency percentiles per job.
//!
//! The jobs overwrite the volume's first `--size` bytes (filled first, so reads read data):
//! a volume that already holds data is refused unless `--overwrite` is given.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use cairn_proto::metadata as pb;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde_json::json;

use crate::args::BenchArgs;
use cairn_proto::format_size;

use crate::output::{table, Printer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
}

struct Job {
    name: &'static str,
    pattern: Pattern,
    bs: u64,
    qd: usize,
}

const JOBS: &[Job] = &[
    Job {
        name: "4K randwrite QD1",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 1,
    },
    Job {
        name: "4K randread QD1",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
    },
    Job {
        name: "4K randwrite QD32",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
    },
    Job {
        name: "4K randread QD32",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
    },
    Job {
        name: "1M seq write QD4",
        pattern: Pattern::SeqWrite,
        bs: 1 << 20,
        qd: 4,
    },
    Job {
        name: "1M seq read QD4",
        pattern: Pattern::SeqRead,
        bs: 1 << 20,
        qd: 4,
    },
];

/// What one job measured.
struct Report {
    name: &'static str,
    ops: u64,
    bytes: u64,
    secs: f64,
    /// Latency in microseconds.
    lat: Histogram<u64>,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>18} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_owned());
    pb
}

pub async fn run(a: BenchArgs, meta: &[String], out: &Printer) -> anyhow::Result<()> {
    anyhow::ensure!(a.runtime > 0, "--runtime must be at least 1 second");
    let client = MetaClient::new(meta)?;
    let layout = client
        .call(|mut c| {
            let volume = a.volume.clone();
            async move { c.get_layout(pb::GetLayoutRequest { volume }).await }
        })
        .await?;
    anyhow::ensure!(
        layout.segments.is_empty() || a.overwrite,
        "volume {} holds data, and the benchmark overwrites its first {}; give --overwrite to \
         go ahead",
        a.volume,
        format_size(a.size)
    );
    let host = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    let vc = VolumeClient::attach(
        client,
        &a.volume,
        AttachOptions {
            holder: format!("cairn-bench@{host}"),
            force: false,
            host,
        },
    )
    .await
    .with_context(|| format!("attaching {}", a.volume))?;
    let region = a.size.min(vc.size()) / (1 << 20) * (1 << 20);
    anyhow::ensure!(
        region >= 1 << 20,
        "volume {} is smaller than 1 MiB",
        a.volume
    );
    let result = jobs(&vc, region, &a, out.json).await;
    let detached = vc.detach().await;
    let reports = result?;
    detached?;
    print(out, &a.volume, region, &reports)
}

async fn jobs(
    vc: &Arc<VolumeClient>,
    region: u64,
    a: &BenchArgs,
    quiet: bool,
) -> anyhow::Result<Vec<Report>> {
    // Fill the region once: reads read data, writes overwrite (a VM disk's steady state).
    let pb = bar(region, "fill");
    if quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
    let next = AtomicU64::new(0);
    let fill = (0..4).map(|_| async {
        loop {
            let off = next.fetch_add(1 << 20, Ordering::Relaxed);
            if off >= region {
                return Ok::<_, anyhow::Error>(());
            }
            vc.write(off, chunk.clone()).await?;
            pb.inc(1 << 20);
        }
    });
    futures::future::try_join_all(fill).await?;
    pb.finish_with_message(format!("{} written", format_size(region)));
    let mut reports = Vec::new();
    for job in JOBS {
        reports.push(one_job(vc, region, job, Duration::from_secs(a.runtime), quiet).await?);
    }
    Ok(reports)
}

async fn one_job(
    vc: &Arc<VolumeClient>,
    region: u64,
    job: &Job,
    runtime: Duration,
    quiet: bool,
) -> anyhow::Result<Report> {
    let pb = bar(runtime.as_millis() as u64, job.name);
    if quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let ops = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let data = Bytes::from(vec![0x5au8; job.bs as usize]);
    let blocks = region / job.bs;
    let workers = (0..job.qd).map(|_| {
        let (vc, hist, ops, seq, data) = (
            vc.clone(),
            hist.clone(),
            ops.clone(),
            seq.clone(),
            data.clone(),
        );
        async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut rng = rand::thread_rng();
            while started.elapsed() < runtime {
                let off = match job.pattern {
                    Pattern::RandWrite | Pattern::RandRead => rng.gen_range(0..blocks) * job.bs,
                    Pattern::SeqWrite | Pattern::SeqRead => {
                        (seq.fetch_add(1, Ordering::Relaxed) % blocks) * job.bs
                    }
                };
                let t = Instant::now();
                match job.pattern {
                    Pattern::RandWrite | Pattern::SeqWrite => vc.write(off, data.clone()).await?,
                    Pattern::RandRead | Pattern::SeqRead => {
                        vc.read(off, job.bs).await?;
                    }
                }
                local.saturating_record(t.elapsed().as_micros() as u64);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            hist.lock().expect("histogram lock").add(&local)?;
            Ok::<_, anyhow::Error>(())
        }
    });
    let ticker = {
        let (pb, ops) = (pb.clone(), ops.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let secs = started.elapsed().as_secs_f64();
                pb.set_position((secs * 1000.0) as u64);
                pb.set_message(format!(
                    "{:.0} IOPS",
                    ops.load(Ordering::Relaxed) as f64 / secs
                ));
            }
        })
    };
    let r = futures::future::try_join_all(workers).await;
    ticker.abort();
    r.with_context(|| format!("job {}", job.name))?;
    let secs = started.elapsed().as_secs_f64();
    let n = ops.load(Ordering::Relaxed);
    pb.finish_with_message(format!("{:.0} IOPS", n as f64 / secs));
    let lat = hist.lock().expect("histogram lock").clone();
    Ok(Report {
        name: job.name,
        ops: n,
        bytes: n * job.bs,
        secs,
        lat,
    })
}

fn print(out: &Printer, volume: &str, region: u64, reports: &[Report]) -> anyhow::Result<()> {
    let pct = |r: &Report, q: f64| r.lat.value_at_quantile(q);
    if out.json {
        let jobs: Vec<_> = reports
            .iter()
            .map(|r| {
                json!({
                    "job": r.name, "ops": r.ops, "seconds": r.secs,
                    "iops": r.ops as f64 / r.secs,
                    "mib_s": r.bytes as f64 / r.secs / (1u64 << 20) as f64,
                    "lat_us": {"p50": pct(r, 0.5), "p99": pct(r, 0.99), "p99_9": pct(r, 0.999),
                               "max": r.lat.max()},
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"volume": volume, "region_bytes": region, "jobs": jobs})
            )?
        );
        return Ok(());
    }
    println!(
        "\n{volume}: {} region, through the client library\n",
        format_size(region)
    );
    let mut t = table(&["JOB", "IOPS", "MiB/s", "P50", "P99", "P99.9", "MAX"]);
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    for r in reports {
        t.add_row(vec![
            r.name.to_owned(),
            format!("{:.0}", r.ops as f64 / r.secs),
            format!("{:.1}", r.bytes as f64 / r.secs / (1u64 << 20) as f64),
            ms(pct(r, 0.5)),
            ms(pct(r, 0.99)),
            ms(pct(r, 0.999)),
            ms(r.lat.max()),
        ]);
    }
    println!("{t}");
    Ok(())
}
