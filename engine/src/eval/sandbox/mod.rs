//! Running model-written programs under node, contained.
//!
//! # Threat model
//! A program run here is hostile: a model wrote it, and prompts and training data steer models.
//! It may try to read or write the user's files, reach the network or a socket of the host,
//! signal, renice or list host processes (codelsi among them), outlive its run, fill the disk or
//! memory, or forge its result. (Forging is the grader's side: `eval/grader.js`.)
//!
//! On Linux (`linux.rs`) each program runs in a jail made by bubblewrap, each layer covering
//! what another might miss:
//! - fresh user, mount, PID, IPC, UTS, network and cgroup namespaces; no capabilities, no
//!   further user namespaces; the jail's own uid, and when codelsi runs as root, the jail is
//!   entered as `nobody` so no host file or process is its own;
//! - a file system of its own: node and the libraries it loads, read-only; a fresh `/proc`
//!   that shows the jail's processes only; a minimal `/dev`; a working folder on a tmpfs
//!   whose size is the disk limit. Nothing else of the host exists in there, so no host path,
//!   file or unix socket can be named, and nothing it writes reaches the host;
//! - seccomp: the system calls a test program has no use for and that widen the kernel's
//!   surface (ptrace, bpf, perf, keyrings, mounts, namespaces, io_uring, modules) fail;
//! - node's permission model: reads and writes only in the working folder, no child
//!   processes, workers, addons or inspector;
//! - rlimits: CPU seconds, address space, file size, no core dumps;
//! - its own session, killed at the wall-time limit or when its output passes the cap, and
//!   when it ends: the jail's first process dies, and the kernel kills every other process in
//!   its PID namespace with it. When codelsi dies, the jail dies with it (`--die-with-parent`).
//!
//! Elsewhere (or where the kernel refuses namespaces, or bubblewrap is missing) no layer of
//! that strength is set up here: programs run only when the user says they accept running them
//! with node's permission model and rlimits alone ([`Sandbox::detect`]'s `allow_unsafe`, the
//! CLI's `--unsafe-no-sandbox`), and codelsi says so loudly.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(unix)]
mod unix;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
    /// Everything the program writes to its folder, together (in the jail, the size of its
    /// tmpfs; unsandboxed, each file).
    #[serde(default = "default_disk_bytes")]
    pub disk_bytes: u64,
}

fn default_disk_bytes() -> u64 {
    64 << 20
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_secs: 10,
            wall: Duration::from_secs(15),
            memory_bytes: 2 << 30,
            output_bytes: 256 << 10,
            disk_bytes: default_disk_bytes(),
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
    /// Whether stdout held the marker the run was asked to look for.
    pub marker_seen: bool,
    /// What followed the marker's last occurrence on its line (a program's report).
    #[serde(default)]
    pub marker_line: Option<String>,
}

/// What keeps programs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A bubblewrap jail (namespaces, a file system of its own, no capabilities), with a
    /// seccomp filter when `seccomp`.
    Namespaces { seccomp: bool },
    /// Only node's permission model and rlimits: the user accepted that (`allow_unsafe`).
    Unsafe,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Namespaces { seccomp: true } => write!(f, "namespaces + seccomp (bubblewrap)"),
            Self::Namespaces { seccomp: false } => write!(f, "namespaces (bubblewrap), no seccomp"),
            Self::Unsafe => write!(f, "NONE (--unsafe-no-sandbox)"),
        }
    }
}

/// A way to run node programs, found once. Owns a temporary folder (removed on drop).
#[derive(Debug)]
pub struct Sandbox {
    pub node: PathBuf,
    /// `--permission` (node ≥ 22) or `--experimental-permission` (node 20).
    permission_flag: &'static str,
    pub isolation: Isolation,
    #[cfg(target_os = "linux")]
    jail: Option<linux::Jail>,
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

/// `node -e` this: the program comes on stdin, is written to `main.js` in the working folder
/// and run as the main module would be.
const RUN_MAIN: &str = "const fs = require('fs'); fs.writeFileSync('main.js', \
                        fs.readFileSync(0)); require(require('path').resolve('main.js'));";

/// The working folder inside the jail.
#[cfg(target_os = "linux")]
const JAIL_DIR: &str = "/work";

impl Sandbox {
    /// Find node, the permission flag it takes, and the strongest isolation this system
    /// allows. Where no sandbox can be set up, this is an error unless `allow_unsafe` (then
    /// `status` is told, loudly).
    pub fn detect(allow_unsafe: bool, status: &mut dyn FnMut(&str)) -> Result<Self> {
        let mut sandbox = Self::unjailed()?;
        match sandbox.jail() {
            Ok(()) => Ok(sandbox),
            Err(why) => sandbox.without_jail(&why, allow_unsafe, status),
        }
    }

    /// node and its permission flag, with no jail yet.
    fn unjailed() -> Result<Self> {
        let node = std::env::var_os("CODELSI_NODE")
            .map(PathBuf::from)
            .or_else(|| which("node"))
            .ok_or_else(|| Error::Tool {
                tool: "node".into(),
                what: "not found on PATH (set CODELSI_NODE): evaluation runs programs \
                           under node; `bash .ci/run --setup-only` installs it"
                    .into(),
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
            return Err(Error::Tool {
                tool: node.display().to_string(),
                what: "this node has no permission model (node 20 or newer has); the sandbox \
                       needs it to refuse child processes and writes outside its folder"
                    .into(),
            });
        };
        let root = std::env::temp_dir().join(format!(
            "codelsi-sandbox-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(Self {
            node,
            permission_flag,
            isolation: Isolation::Unsafe,
            #[cfg(target_os = "linux")]
            jail: None,
            root,
        })
    }

    /// No jail could be set up (`why`): refuse, or with the user's word (`allow_unsafe`), go
    /// on unjailed and say so loudly.
    fn without_jail(
        self,
        why: &str,
        allow_unsafe: bool,
        status: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        if !allow_unsafe {
            return Err(Error::NoSandbox {
                why: format!(
                    "{why}. Without one, a program a model wrote could read, write or delete \
                     your files, reach your network and signal your processes. Pass \
                     --unsafe-no-sandbox to run them anyway"
                ),
            });
        }
        status(&format!(
            "WARNING: NO SANDBOX ({why}). Model-written programs run with node's permission \
             model and rlimits only, as you asked (--unsafe-no-sandbox): they can see your file \
             system and your processes."
        ));
        Ok(self)
    }

    /// Set up the jail and check that a program runs in it; why not, when it cannot be.
    #[cfg(target_os = "linux")]
    fn jail(&mut self) -> std::result::Result<(), String> {
        let jail = linux::Jail::find(&self.node, &self.root)?;
        self.isolation = Isolation::Namespaces {
            seccomp: jail.has_seccomp(),
        };
        self.jail = Some(jail);
        let why = match self.run_js("process.exit(0)", &Limits::default(), None) {
            Ok(probe) if probe.status == Status::Passed => return Ok(()),
            Ok(probe) => probe.output_tail,
            Err(e) => match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        };
        // Whatever failed, the sandbox is left without the jail (`--unsafe-no-sandbox` may
        // still run programs unjailed).
        self.jail = None;
        self.isolation = Isolation::Unsafe;
        Err(format!("bubblewrap could not start a program: {why}"))
    }

    #[cfg(not(target_os = "linux"))]
    fn jail(&mut self) -> std::result::Result<(), String> {
        Err(format!(
            "codelsi has no sandbox for {} yet (it has one for Linux)",
            std::env::consts::OS
        ))
    }

    /// Run `js` (CommonJS) as `main.js` in a fresh folder, within `limits`; `marker`, when
    /// given, is looked for in what it prints.
    pub fn run_js(&self, js: &str, limits: &Limits, marker: Option<&str>) -> Result<RunResult> {
        self.run_script(RUN_MAIN, js.as_bytes(), limits, marker)
    }

    /// Run `node -e script` in a fresh folder with `stdin` as its standard input, within
    /// `limits`; `marker`, when given, is looked for in what it prints.
    pub fn run_script(
        &self,
        script: &str,
        stdin: &[u8],
        limits: &Limits,
        marker: Option<&str>,
    ) -> Result<RunResult> {
        #[cfg(target_os = "linux")]
        if let Some(jail) = &self.jail {
            let (cmd, seccomp) = jail.command(
                &self.node,
                &self.node_args(Path::new(JAIL_DIR), script, limits),
                limits,
            )?;
            let r = self.run(cmd, stdin, limits, marker, true);
            drop(seccomp);
            return r;
        }
        let dir = self
            .root
            .join(format!("run-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut cmd = Command::new(&self.node);
        cmd.args(self.node_args(&dir, script, limits))
            .current_dir(&dir)
            .env_clear()
            .env("HOME", &dir)
            .env("TMPDIR", &dir)
            .env("PATH", "/usr/bin:/bin")
            .env("NODE_NO_WARNINGS", "1");
        // Windows loads system DLLs from SystemRoot.
        if let Some(root) = std::env::var_os("SystemRoot") {
            cmd.env("SystemRoot", root);
        }
        #[cfg(unix)]
        unix::contain(&mut cmd, limits, None);
        let r = self.run(cmd, stdin, limits, marker, false);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    /// node's flags: the permission model confined to `dir`, the heap limit, the script.
    fn node_args(&self, dir: &Path, script: &str, limits: &Limits) -> Vec<String> {
        let d = dir.display();
        vec![
            self.permission_flag.to_string(),
            format!("--allow-fs-read={d}"),
            format!("--allow-fs-write={d}"),
            format!(
                "--max-old-space-size={}",
                (limits.memory_bytes / 2 / (1 << 20)).max(64)
            ),
            "-e".into(),
            script.into(),
        ]
    }

    /// Spawn `cmd`, feed it `stdin`, collect its output up to the cap, and end it (and all it
    /// started) at the wall limit, at the cap, or when it exits. `jailed`: the exit status is
    /// bubblewrap's, which reports a signal `n` as 128 + n.
    fn run(
        &self,
        mut cmd: Command,
        stdin: &[u8],
        limits: &Limits,
        marker: Option<&str>,
        jailed: bool,
    ) -> Result<RunResult> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        // The program spawned is bubblewrap in the jail, node outside it.
        let mut child = cmd.spawn().map_err(|e| Error::io(cmd.get_program(), e))?;
        // The program may never read its input: the writer must not hold up the run.
        let feed = child.stdin.take().map(|mut pipe| {
            let bytes = stdin.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            })
        });
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
                        // The waiting loop below ends the program.
                        over.store(true, Ordering::Relaxed);
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
            if over.load(Ordering::Relaxed) {
                kill(&mut child);
                break child.wait().ok();
            }
            if start.elapsed() > limits.wall {
                timed_out = true;
                kill(&mut child);
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Whatever it started dies with it.
        kill(&mut child);
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if let Some(feed) = feed {
            let _ = feed.join();
        }
        let seconds = start.elapsed().as_secs_f64();
        let (exit_code, signal) = match status {
            Some(s) => ended(s, jailed),
            None => (None, None),
        };
        let result = if over.load(Ordering::Relaxed) {
            Status::OutputLimit
        } else if timed_out || signal == Some(SIGXCPU) {
            Status::Timeout
        } else if signal == Some(SIGKILL) && seconds >= limits.cpu_secs as f64 {
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
        Ok(RunResult {
            status: result,
            exit_code,
            output_tail: tail(tail_of, 2000),
            seconds,
            marker_seen: marker_line.is_some(),
            marker_line,
        })
    }
}

// Signal numbers as Linux and the BSDs have them (what the status classification compares).
const SIGKILL: i32 = 9;
const SIGXCPU: i32 = 24;

/// The exit code, or the signal that ended the program.
fn ended(status: ExitStatus, jailed: bool) -> (Option<i32>, Option<i32>) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return (None, Some(sig));
        }
    }
    match status.code() {
        Some(code) if jailed && (129..=128 + 64).contains(&code) => (None, Some(code - 128)),
        code => (code, None),
    }
}

/// End the program and everything it started: its process group on unix (in the jail, the
/// jail's first process, whose death ends the PID namespace), the process elsewhere.
fn kill(child: &mut Child) {
    #[cfg(unix)]
    unix::kill_group(child.id());
    #[cfg(not(unix))]
    let _ = child.kill();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Where no jail can be set up (every system but Linux, or Linux without bubblewrap or
    /// user namespaces): a refusal that names the flag, or with it, a loud warning and programs
    /// that still run under node's permission model and the limits.
    #[test]
    #[ignore = "needs node (and bubblewrap): the full tier runs it, `-- --include-ignored`"]
    fn without_a_jail_refuses_unless_told() {
        let unjailed = || Sandbox::unjailed().unwrap_or_else(|e| panic!("{e}"));
        let refused = unjailed().without_jail("no jail in this test", false, &mut |_| {});
        assert!(
            matches!(&refused, Err(Error::NoSandbox { why }) if why.contains("--unsafe-no-sandbox")),
            "{refused:?}"
        );
        let mut warned = String::new();
        let sandbox = unjailed()
            .without_jail("no jail in this test", true, &mut |s| warned.push_str(s))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(warned.starts_with("WARNING: NO SANDBOX"), "{warned}");
        let limits = Limits {
            cpu_secs: 2,
            wall: Duration::from_secs(5),
            ..Limits::default()
        };
        let run = |js: &str| {
            sandbox
                .run_js(js, &limits, Some("done:"))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let ok = run(
            "require('fs').writeFileSync('x', 'y'); console.log('done:' + require('fs').readFileSync('x'))",
        );
        assert_eq!(
            (ok.status, ok.marker_line.as_deref()),
            (Status::Passed, Some("y")),
            "{ok:?}"
        );
        let spawn = run("require('child_process').spawnSync('true')");
        assert_eq!(spawn.status, Status::Failed, "{spawn:?}");
        assert!(spawn.output_tail.contains("ERR_ACCESS_DENIED"), "{spawn:?}");
        assert_eq!(run("for (;;) {}").status, Status::Timeout);
        assert_eq!(sandbox.isolation, Isolation::Unsafe);
    }
}
