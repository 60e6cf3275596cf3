//! Running model-written programs under node, contained. Layers, each covering what another
//! might miss:
//!
//! - its own temporary folder as working directory and HOME, an empty environment;
//! - node's permission model: reads and writes only inside that folder, no child processes,
//!   no worker threads, no native addons (a fork bomb or a write elsewhere throws);
//! - rlimits: CPU seconds, address space (a 10 GB allocation fails), file size, no core dumps;
//! - a network namespace of its own (no interfaces but loopback) where the kernel allows one;
//! - its own session and process group, killed whole at the wall-time limit or when its output
//!   passes the cap, and after it exits (so nothing it started lives on).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What one program may use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub cpu_secs: u64,
    pub wall: Duration,
    pub memory_bytes: u64,
    /// stdout and stderr together.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_secs: 10,
            wall: Duration::from_secs(15),
            memory_bytes: 2 << 30,
            output_bytes: 256 << 10,
        }
    }
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Passed,
    /// Non-zero exit: a failed assertion, an exception, a refused operation.
    Failed,
    /// CPU or wall time ran out.
    Timeout,
    /// It wrote more than the output cap.
    OutputLimit,
    /// Killed by a signal other than the limits' (a crash, running out of memory).
    Crashed,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub status: Status,
    pub exit_code: Option<i32>,
    /// The last part of stderr (or stdout when stderr is empty).
    pub output_tail: String,
    pub seconds: f64,
    /// Whether stdout held the marker `run_js` was asked to look for.
    pub marker_seen: bool,
    /// What followed the marker's last occurrence on its line (a program's report).
    #[serde(default)]
    pub marker_line: Option<String>,
}

/// Whether programs get a network namespace of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetIsolation {
    /// `unshare(CLONE_NEWNET)` (running as root).
    Namespace,
    /// `unshare(CLONE_NEWUSER | CLONE_NEWNET)` (an unprivileged user namespace).
    UserNamespace,
    /// Neither is allowed here: only node's permission model and the other limits apply.
    None,
}

/// A way to run node programs, found once. Owns a temporary folder (removed on drop).
#[derive(Debug)]
pub struct Sandbox {
    pub node: PathBuf,
    /// `--permission` (node ≥ 22) or `--experimental-permission` (node 20).
    permission_flag: &'static str,
    pub net: NetIsolation,
    root: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

impl Sandbox {
    /// Find node, the permission flag it takes, and the network isolation this kernel allows.
    pub fn detect() -> Result<Self> {
        let node = std::env::var_os("CODELSI_NODE")
            .map(PathBuf::from)
            .or_else(|| which("node"))
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "node was not found on PATH (set CODELSI_NODE): evaluation runs programs \
                     under node; `bash .ci/run --setup-only` installs it"
                        .into(),
                )
            })?;
        let ok = |flag: &str| {
            Command::new(&node)
                .args([flag, "--allow-fs-read=*", "-e", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let permission_flag = if ok("--permission") {
            "--permission"
        } else if ok("--experimental-permission") {
            "--experimental-permission"
        } else {
            return Err(Error::InvalidArgument(format!(
                "{}: this node has no permission model (node 20 or newer has); the sandbox \
                 needs it to refuse child processes and writes outside its folder",
                node.display()
            )));
        };
        let root = std::env::temp_dir().join(format!("codelsi-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let mut sb = Self {
            node,
            permission_flag,
            net: NetIsolation::None,
            root,
        };
        for net in [NetIsolation::Namespace, NetIsolation::UserNamespace] {
            sb.net = net;
            let r = sb.run_js("process.exit(0)", &Limits::default(), None)?;
            if r.status == Status::Passed {
                return Ok(sb);
            }
        }
        sb.net = NetIsolation::None;
        Ok(sb)
    }

    /// Run `js` (CommonJS) as `main.js` in a fresh folder, within `limits`; `marker`, when
    /// given, is looked for in what it prints.
    pub fn run_js(&self, js: &str, limits: &Limits, marker: Option<&str>) -> Result<RunResult> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!("run-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let main = dir.join("main.js");
        std::fs::write(&main, js).map_err(|e| Error::io(&main, e))?;
        let result = self.run_in(&dir, limits, marker);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn run_in(&self, dir: &Path, limits: &Limits, marker: Option<&str>) -> Result<RunResult> {
        let d = dir.display();
        let mut cmd = Command::new(&self.node);
        cmd.arg(self.permission_flag)
            .arg(format!("--allow-fs-read={d}"))
            .arg(format!("--allow-fs-write={d}"))
            .arg(format!(
                "--max-old-space-size={}",
                (limits.memory_bytes / 2 / (1 << 20)).max(64)
            ))
            .arg("main.js")
            .current_dir(dir)
            .env_clear()
            .env("HOME", dir)
            .env("TMPDIR", dir)
            .env("PATH", "/usr/bin:/bin")
            .env("NODE_NO_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (cpu, mem, net) = (limits.cpu_secs, limits.memory_bytes, self.net);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (setsid, setrlimit, unshare), allocating nothing.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let set = |res, v: u64| {
                    let lim = libc::rlimit {
                        rlim_cur: v as libc::rlim_t,
                        rlim_max: v as libc::rlim_t,
                    };
                    libc::setrlimit(res, &lim)
                };
                // CPU: the soft limit sends SIGXCPU; the hard one a second later, SIGKILL.
                let cpu_lim = libc::rlimit {
                    rlim_cur: cpu as libc::rlim_t,
                    rlim_max: (cpu + 1) as libc::rlim_t,
                };
                libc::setrlimit(libc::RLIMIT_CPU, &cpu_lim);
                set(libc::RLIMIT_AS, mem);
                set(libc::RLIMIT_FSIZE, 16 << 20);
                set(libc::RLIMIT_CORE, 0);
                let flags = match net {
                    NetIsolation::Namespace => libc::CLONE_NEWNET,
                    NetIsolation::UserNamespace => libc::CLONE_NEWUSER | libc::CLONE_NEWNET,
                    NetIsolation::None => 0,
                };
                if flags != 0 && libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            // The namespace was refused: the probe in `detect` sees this as a failed run.
            Err(e) if net != NetIsolation::None => {
                return Ok(RunResult {
                    status: Status::Crashed,
                    exit_code: None,
                    output_tail: format!("sandbox: {e}"),
                    seconds: 0.0,
                    marker_seen: false,
                    marker_line: None,
                });
            }
            Err(e) => return Err(Error::io(&self.node, e)),
        };
        let pgid = child.id() as libc::pid_t;
        let kill_group = move || {
            // SAFETY: kill(2) on our child's process group; harmless if it is gone.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        };
        let total = Arc::new(AtomicUsize::new(0));
        let over = Arc::new(AtomicBool::new(false));
        let reader = |stream: Option<Box<dyn Read + Send>>| {
            let (total, over) = (total.clone(), over.clone());
            let cap = limits.output_bytes;
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let Some(mut s) = stream else { return kept };
                let mut buf = [0u8; 8192];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if total.fetch_add(n, Ordering::Relaxed) + n > cap {
                        over.store(true, Ordering::Relaxed);
                        kill_group();
                        break;
                    }
                    kept.extend_from_slice(&buf[..n]);
                }
                kept
            })
        };
        let out = reader(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = reader(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) => {}
                Err(_) => break None,
            }
            if start.elapsed() > limits.wall {
                timed_out = true;
                kill_group();
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Whatever it started dies with it.
        kill_group();
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        let seconds = start.elapsed().as_secs_f64();
        use std::os::unix::process::ExitStatusExt;
        let exit_code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        let result = if over.load(Ordering::Relaxed) {
            Status::OutputLimit
        } else if timed_out || matches!(signal, Some(libc::SIGXCPU)) {
            Status::Timeout
        } else if signal == Some(libc::SIGKILL) && seconds >= limits.cpu_secs as f64 {
            // The CPU hard limit.
            Status::Timeout
        } else if exit_code == Some(0) {
            Status::Passed
        } else if exit_code.is_some() {
            Status::Failed
        } else {
            Status::Crashed
        };
        let tail_of = if stderr.is_empty() { &stdout } else { &stderr };
        let marker_line = marker.and_then(|m| {
            let m = m.as_bytes();
            let at = stdout.windows(m.len()).rposition(|w| w == m)? + m.len();
            let rest = &stdout[at..];
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            Some(String::from_utf8_lossy(&rest[..end]).into_owned())
        });
        let marker_seen = marker_line.is_some();
        Ok(RunResult {
            status: result,
            exit_code,
            output_tail: tail(tail_of, 2000),
            seconds,
            marker_seen,
            marker_line,
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The last `n` bytes of `bytes` as text, led by the first line that names an error (node's
/// reason comes before a long stack trace) when the tail does not hold it.
fn tail(bytes: &[u8], n: usize) -> String {
    let reason = bytes
        .split(|&b| b == b'\n')
        .map(String::from_utf8_lossy)
        .find(|l| l.contains("Error") || l.contains("error"))
        .map(|l| l.trim().chars().take(300).collect::<String>());
    let t = tail_only(bytes, n);
    match reason {
        Some(r) if !t.contains(&r) => format!("{r}\n…\n{t}"),
        _ => t,
    }
}

fn tail_only(bytes: &[u8], n: usize) -> String {
    let start = bytes.len().saturating_sub(n);
    let s = String::from_utf8_lossy(&bytes[start..]);
    // Node ends a crash report with its version; the reason is the line before.
    let s = s.trim();
    let s = match s.rfind('\n') {
        Some(i) if s[i + 1..].starts_with("Node.js v") => s[..i].trim_end(),
        _ => s,
    };
    s.to_string()
}
