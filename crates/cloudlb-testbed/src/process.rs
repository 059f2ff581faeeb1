//! Child processes and scratch directories of the testbed.
//!
//! Every child is spawned from one long-lived thread (`testbed-spawner`) with
//! `PR_SET_PDEATHSIG = SIGKILL`. The kernel sends that signal when the *thread* that forked the
//! child exits; the spawner thread lives as long as the test process, so children die with the
//! test binary however it ends (normal exit, panic, `process::exit`, SIGKILL, Ctrl-C).
//!
//! Shared processes live in statics, which are never dropped. An `atexit` handler therefore kills
//! and reaps every child still registered and deletes the scratch directories — unless a test
//! failed ([`mark_failed`]), in which case the directories are kept for inspection. Directories
//! left behind by a test process that was killed are swept on the next start.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};

/// Marker file inside a scratch directory that was kept because a test failed.
const KEEP_MARKER: &str = "KEPT-BECAUSE-A-TEST-FAILED";
const DIR_PREFIX: &str = "cloudlb-test-";

static FAILED: AtomicBool = AtomicBool::new(false);

/// Remembers that a test failed: scratch directories are kept (and their paths printed) at exit.
pub fn mark_failed() {
    FAILED.store(true, Ordering::SeqCst);
}

/// Keeps the scratch directories at exit although nothing failed (the benchmark's `--keep`).
pub fn keep_scratch_dirs() {
    mark_failed();
}

struct Registry {
    pids: Vec<libc::pid_t>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves plain data behind; keep using it.
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

extern "C" fn cleanup_at_exit() {
    // Never block or panic at exit: a panic here would abort the process.
    let Ok(mut registry) = REGISTRY.try_lock() else {
        return;
    };
    for pid in registry.pids.drain(..) {
        // SAFETY: plain syscalls on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    let keep = FAILED.load(Ordering::SeqCst);
    for dir in registry.dirs.drain(..) {
        if keep {
            let _ = fs::write(dir.join(KEEP_MARKER), b"");
            eprintln!("testbed: kept {}", dir.display());
        } else {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread) never ends.
                for mut request in rx {
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .expect("start the testbed-spawner thread");
        // SAFETY: registers a plain `extern "C" fn()` that never unwinds.
        let rc = unsafe { libc::atexit(cleanup_at_exit) };
        assert_eq!(rc, 0, "libc::atexit failed to register the testbed cleanup");
        tx
    })
}

/// A child process whose stdout and stderr go to `<dir>/<name>.log`.
///
/// Dropping it kills and reaps the process. Processes held by statics are never dropped; they
/// are killed by the `atexit` handler or, at the latest, by `PR_SET_PDEATHSIG`.
pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ManagedProcess {
    /// Spawns `program args…` with its working directory and log in `dir`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> io::Result<Self> {
        Self::spawn_with_env(name, program, args, &[], dir)
    }

    /// Like [`ManagedProcess::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
    ) -> io::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls; it does not allocate.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let (reply, answer) = mpsc::channel();
        spawner()
            .send(SpawnRequest { command, reply })
            .map_err(|_| io::Error::other("the testbed-spawner thread is gone"))?;
        let child = answer
            .recv()
            .map_err(|_| io::Error::other("the testbed-spawner thread dropped the request"))?
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", program.display())))?;
        registry().pids.push(child.id() as libc::pid_t);
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// SIGKILL and reap (no-op if it already exited).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `n` lines of the process log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log, n)
    }

    /// `== name (log path) ==` followed by the last `n` log lines.
    pub fn log_section(&self, n: usize) -> String {
        format!(
            "== {} ({}) ==\n{}",
            self.name,
            self.log.display(),
            self.log_tail(n)
        )
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id() as libc::pid_t;
        registry().pids.retain(|p| *p != pid);
    }
}

/// The last `n` lines of a text file (reads at most the final 256 KiB).
pub fn tail_lines(path: &Path, n: usize) -> String {
    const WINDOW: u64 = 256 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A scratch directory `std::env::temp_dir()/cloudlb-test-<pid>-<n>`.
///
/// Dropped normally it is deleted; dropped while the thread panics, or at exit after a test
/// failed, it is kept and its path printed.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SWEEP: OnceLock<()> = OnceLock::new();
        SWEEP.get_or_init(sweep_stale_dirs);
        // Make sure the atexit handler is registered before anything needs cleaning.
        spawner();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        registry().dirs.push(path.clone());
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        registry().dirs.retain(|d| d != &self.path);
        if std::thread::panicking() || FAILED.load(Ordering::SeqCst) {
            let _ = fs::write(self.path.join(KEEP_MARKER), b"");
            eprintln!("testbed: kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Deletes `cloudlb-test-<pid>-*` directories of test processes that no longer exist, unless
/// they were kept on purpose after a failure.
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let path = entry.path();
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && !path.join(KEEP_MARKER).exists()
        {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// A loopback TCP port that was free a moment ago and has not been handed out by this process
/// before. Another process may still take it first: callers retry when a child fails to bind.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a port");
        let port = listener
            .local_addr()
            .expect("local address of a bound listener")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// True when a log says the process could not bind its port (worth a retry on other ports).
pub fn lost_port_race(log_tail: &str) -> bool {
    log_tail.contains("address already in use")
}

/// How often a server is started on fresh ports before its failure is final.
const START_ATTEMPTS: usize = 3;

/// Runs `attempt` (a start on fresh ports) until it succeeds, again only when its failure log
/// says it lost a race for a port ([`free_port`] releases the port before the server binds it).
/// On the final failure the scratch directories are kept and the last log is returned.
pub async fn start_on_free_ports<T, Fut>(
    what: &str,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, String>
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut last_failure = String::new();
    for n in 1..=START_ATTEMPTS {
        match attempt().await {
            Ok(started) => return Ok(started),
            Err(log) => {
                last_failure = log;
                if n == START_ATTEMPTS || !lost_port_race(&last_failure) {
                    break;
                }
                eprintln!(
                    "testbed: {what} lost a port race on attempt {n}, retrying:\n{last_failure}"
                );
            }
        }
    }
    mark_failed();
    Err(last_failure)
}

/// Prints how long a testbed server took to start, where it listens and its scratch directory.
pub fn announce_started(what: &str, took: std::time::Duration, address: &str, dir: &TempDir) {
    eprintln!(
        "{what} started in {} ms ({address}; dir {})",
        took.as_millis(),
        dir.path().display()
    );
}

/// Locates a testbed binary: `$env_var`, then `<cache>/<cache_relative>` (`CLOUDLB_CACHE`, else
/// `$XDG_CACHE_HOME/cloudlb`, else `~/.cache/cloudlb`), then `fallbacks`.
pub fn find_binary(env_var: &str, cache_relative: &str, fallbacks: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let cached = cache_dir().join(cache_relative);
    if cached.is_file() {
        return cached;
    }
    for fallback in fallbacks {
        let path = PathBuf::from(fallback);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "testbed binary not found: {} (nor ${env_var}, nor {fallbacks:?}). \
         Run scripts/install-test-deps to install the test dependencies.",
        cached.display()
    );
}

/// `${CLOUDLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlb}`, as in scripts/install-test-deps.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLOUDLB_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("neither CLOUDLB_CACHE, XDG_CACHE_HOME nor HOME is set");
    base.join("cloudlb")
}

/// The testbed's release versions: `testbed/versions`, overridden by the environment variable of
/// the same name (`CLOUDLB_KUBE_VERSION`, `CLOUDLB_ETCD_VERSION`), as in scripts/install-test-deps.
pub fn testbed_version(var: &str) -> String {
    if let Ok(v) = std::env::var(var) {
        return v.trim_start_matches('v').to_string();
    }
    include_str!("../../../testbed/versions")
        .lines()
        .find_map(|line| line.strip_prefix(var)?.strip_prefix('='))
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .unwrap_or_else(|| panic!("testbed/versions has no {var}=… line"))
}

/// `<cache>/k8s/v<CLOUDLB_KUBE_VERSION>/<binary>` (kube-apiserver, kube-controller-manager).
pub fn kube_binary(env_var: &str, binary: &str) -> PathBuf {
    let version = testbed_version("CLOUDLB_KUBE_VERSION");
    find_binary(env_var, &format!("k8s/v{version}/{binary}"), &[])
}

/// `<cache>/etcd/v<CLOUDLB_ETCD_VERSION>/etcd`.
pub fn etcd_binary() -> PathBuf {
    let version = testbed_version("CLOUDLB_ETCD_VERSION");
    find_binary("CLOUDLB_ETCD", &format!("etcd/v{version}/etcd"), &[])
}

/// Runs `command` to completion and returns its output; one that fails or cannot start panics
/// with what it printed.
pub fn run_ok(command: &mut std::process::Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
