//! `codelsi train --nodes`: two processes on this machine, as two nodes of one run over
//! loopback (burn-collective's global mode: node 0's coordinator, tensors exchanged over
//! WebSocket), train what one process with two replicas trains.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A port whose next one is free too (a node serves its tensors on port + 1).
fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let port = a.local_addr().map(|a| a.port()).unwrap_or(0);
        if port > 0 && port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// `codelsi --device cpu train …` on the tiny model, with `extra` arguments, started.
fn train(dir: &Path, out: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_codelsi"))
        .args(["--device", "cpu", "--threads", "1", "train", "--model"])
        .arg(fixtures().join("tiny_llama"))
        .arg("--data")
        .arg(dir.join("data.jsonl"))
        .arg("--out")
        .arg(dir.join(out))
        .args([
            "--rank",
            "4",
            "--alpha",
            "8",
            "--max-steps",
            "3",
            "--batch",
            "4",
            "--max-len",
            "256",
            "--val-frac",
            "0.25",
            "--template",
            "alpaca",
            "--checkpoint-every",
            "0",
            "--lr",
            "1e-2",
            "--format",
            "json",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The run's summary (the last line of its JSON output): its loss curve and final validation
/// loss. A process still running after two minutes is killed: a hang fails the test.
fn finish(mut child: Child, what: &str) -> (Vec<f64>, f64) {
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{what} still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    let losses = summary["losses"]
        .as_array()
        .map(|l| l.iter().filter_map(|p| p[1].as_f64()).collect())
        .unwrap_or_default();
    let val = summary["val_losses"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|p| p[1].as_f64())
        .unwrap_or(f64::NAN);
    (losses, val)
}

#[test]
fn two_nodes_train_like_one_process_with_two_replicas() {
    let dir = std::env::temp_dir().join(format!("codelsi-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let records: String = (0..8)
        .map(|i| {
            format!(
                "{{\"instruction\": \"add {i}\", \"output\": \"const f = (x: number) => x + {i};\"}}\n"
            )
        })
        .collect();
    std::fs::write(dir.join("data.jsonl"), records).unwrap_or_else(|e| panic!("{e}"));

    let (one, one_val) = finish(train(&dir, "one", &["--devices", "cpu,cpu"]), "one process");
    let nodes = format!(
        "127.0.0.1:{},127.0.0.1:{}",
        free_port_pair(),
        free_port_pair()
    );
    let first = train(&dir, "node0", &["--nodes", &nodes, "--node-rank", "0"]);
    let second = train(&dir, "node1", &["--nodes", &nodes, "--node-rank", "1"]);
    let (n0, n0_val) = finish(first, "node 0");
    let (n1, n1_val) = finish(second, "node 1");
    eprintln!("one process {one:?} {one_val}\nnode 0 {n0:?} {n0_val}\nnode 1 {n1:?} {n1_val}");
    assert_eq!(one.len(), 3);
    for (what, curve, val) in [("node 0", &n0, n0_val), ("node 1", &n1, n1_val)] {
        assert_eq!(curve.len(), 3, "{what}");
        for (a, b) in curve.iter().zip(&one) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{what}: {curve:?} vs {one:?}"
            );
        }
        assert!(
            (val - one_val).abs() <= 1e-4 * one_val.abs(),
            "{what}: {val} vs {one_val}"
        );
    }
    // Training moved the adapter: the held-out loss changed from its start.
    assert!(one[2] < one[0], "{one:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
