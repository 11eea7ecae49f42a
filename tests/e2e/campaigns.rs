//! The whole node under churn and under load, as the campaign scripts run it: a 2-minute
//! churn soak (`testnet/soak.sh`: providers leave by SIGTERM and SIGKILL and new ones join
//! while a caller calls `any` through its gateway) and a 200-call load run
//! (`testnet/load.sh`: 200 calls at once through the gateway and over the mesh, on echo and
//! on SmolLM2). Each script checks its own bounds and exits non-zero when one is broken.

use std::process::Command;

use mesh_tests::mesh_bin;

fn script(name: &str, args: &[&str]) -> (bool, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bench = mesh_bin().with_file_name("mesh-bench");
    assert!(
        bench.exists(),
        "{} is missing: build it first with `cargo build -p mesh-testnet` (scripts/test.sh does)",
        bench.display()
    );
    let out = Command::new("bash")
        .arg(root.join("testnet").join(name))
        .args(args)
        .env("MESH_BIN", mesh_bin())
        .env("MESH_BENCH_BIN", bench)
        .env("MESH_MODELS", mesh_tests::models_dir())
        .output()
        .expect("bash runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn two_minutes_of_churn_keep_any_calls_answered_and_nothing_grows() {
    let (ok, out) = script("soak.sh", &["--minutes", "2", "--churn-secs", "5"]);
    assert!(ok, "{out}");
    let summary = out
        .lines()
        .find_map(|l| l.strip_prefix("== summary: "))
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let summary: serde_json::Value = serde_json::from_str(summary).unwrap();
    assert!(summary["churn_events"].as_u64().unwrap() >= 20, "{summary}");
    assert!(
        summary["success_pct"].as_f64().unwrap() >= 99.0,
        "{summary}"
    );
}

#[test]
fn two_hundred_calls_at_once_are_all_answered_or_refused() {
    let (ok, out) = script("load.sh", &["--calls", "200"]);
    assert!(ok, "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("gateway ") || l.starts_with("mesh "))
        .collect();
    assert_eq!(rows.len(), 4, "a row per door and model:\n{out}");
    // Each model answers what its slots and queue hold and refuses the rest at once.
    for row in &rows {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let (answered, refused): (u32, u32) = (cols[3].parse().unwrap(), cols[4].parse().unwrap());
        assert_eq!(cols[2], "200", "{row}");
        assert_eq!((cols[5], cols[6]), ("0", "0"), "none failed or hung: {row}");
        assert!(answered >= 1 && answered + refused == 200, "{row}");
    }
}
