//! A throwaway PostgreSQL server for the tests, from Debian's PostgreSQL 15
//! (installed by `scripts/setup`): made with `initdb` in a fresh temporary
//! directory, listening on a Unix socket there and nowhere else, run as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root).
//!
//! One server per test process, started on first use; every caller gets a
//! database of its own. The shell that starts the server waits on a pipe
//! from this process: when the process ends, however it ends, the pipe
//! closes and the shell stops the server and deletes its files.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The running server.
pub struct Postgres {
    bin: PathBuf,
    socket_dir: String,
    // Held open for the process's life; its end is the server's.
    _keeper: Mutex<Child>,
}

const KEEPER: &str = r#"
set -e
bin=$1
dir=$(mktemp -d "${TMPDIR:-/tmp}/ferry-pg.XXXXXX")
trap '"$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
  { cat "$dir/initdb.log" >&2; exit 1; }
"$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-k $dir -c listen_addresses= -F -c max_connections=300" start >/dev/null ||
  { cat "$dir/server.log" >&2; exit 1; }
echo "$dir"
read -r _ || true
"#;

/// The server of this process, started on first call.
///
/// # Panics
/// When PostgreSQL is not installed or does not start: `scripts/setup`
/// installs it.
pub fn server() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(|| match start() {
        Ok(server) => server,
        Err(e) => panic!("cannot start PostgreSQL for the tests (scripts/setup installs it): {e}"),
    })
}

fn start() -> Result<Postgres, String> {
    let bin = binaries()?;
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh"]);
        c
    } else {
        Command::new("sh")
    };
    let mut keeper = command
        .args(["-c", KEEPER, "sh"])
        .arg(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let stdout = keeper.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let socket_dir = line.trim().to_string();
    if socket_dir.is_empty() {
        let status = keeper.wait().map_err(|e| e.to_string())?;
        return Err(format!("the server did not start ({status})"));
    }
    Ok(Postgres {
        bin,
        socket_dir,
        _keeper: Mutex::new(keeper),
    })
}

/// The newest installed PostgreSQL's programs.
fn binaries() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| format!("no initdb under {}", root.display()))
}

impl Postgres {
    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("ferry_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let status = Command::new(self.bin.join("createdb"))
            .args(["-h", &self.socket_dir, "-U", "postgres", &name])
            .status()
            .expect("createdb runs");
        assert!(status.success(), "createdb {name}: {status}");
        self.url(&name)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}",
            self.socket_dir
        )
    }
}
