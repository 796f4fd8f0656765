//! `cairn bench VOLUME` against a `cairn up` cluster: every job runs and is reported; a volume
//! holding data is refused without --overwrite; a volume that does not exist is one clear
//! error; the lease is released afterwards.

mod common;

use common::UpCluster;

#[test]
fn cairn_bench_runs_every_job_and_reports_it() {
    let c = UpCluster::start();
    c.cairn(&["volume", "create", "b", "--size", "64M"]);
    // `cairn`, without the success check of `UpCluster::cairn`.
    let cairn = |args: &[&str]| {
        std::process::Command::new(common::CAIRN)
            .arg("--meta")
            .arg(&c.meta)
            .args(args)
            .output()
            .unwrap()
    };
    let o = c.cairn(&["--json", "bench", "b", "--runtime", "1", "--size", "16M"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["region_bytes"], 16u64 << 20);
    let jobs = v["jobs"].as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "4K randwrite QD1",
            "4K randread QD1",
            "4K randwrite QD32",
            "4K randread QD32",
            "1M seq write QD4",
            "1M seq read QD4"
        ]
    );
    for j in jobs {
        assert!(j["ops"].as_u64().unwrap() > 0, "{j}");
        let (p50, p99) = (
            j["lat_us"]["p50"].as_u64().unwrap(),
            j["lat_us"]["p99"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p99 >= p50, "{j}");
    }

    // Now the volume holds data: refused without --overwrite, and nothing is written.
    let o = cairn(&["bench", "b", "--runtime", "1", "--size", "16M"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--overwrite") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let o = c.cairn(&[
        "bench",
        "b",
        "--runtime",
        "1",
        "--size",
        "8M",
        "--overwrite",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("4K randread QD32") && stdout.contains("P99"),
        "{stdout}"
    );

    let o = cairn(&["bench", "nope", "--runtime", "1"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("nope") && stderr.lines().count() == 1,
        "{stderr}"
    );

    // The benchmark let go of the volume.
    let o = c.cairn(&["volume", "attach", "b", "--holder", "after-bench"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
