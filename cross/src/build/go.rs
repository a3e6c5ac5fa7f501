//! `ferry build go`: a static ARMv7 Go program, stamped with its version.

use std::path::{Path, PathBuf};

use ferry_protocol::manifest::ArtifactKind;

use super::tool::{self, GO, Tool};
use super::{BuildError, BuildRequest, Built, Stage, build_info};

/// Go-specific build settings.
#[derive(Debug, Clone)]
pub struct GoBuild {
    /// The main package to build, relative to the module (`.` by default).
    pub package: String,
    /// The `go` to build with; `FERRY_GO`, else the first `go` on PATH,
    /// when `None`.
    pub go: Option<PathBuf>,
}

impl Default for GoBuild {
    fn default() -> Self {
        Self {
            package: ".".into(),
            go: None,
        }
    }
}

impl GoBuild {
    /// The toolchain this build uses, and how it was chosen.
    fn toolchain(&self) -> (Tool, &'static str) {
        let named = |path: &Path, how| {
            let missing = format!("no Go toolchain at {}", path.display());
            (Tool::at(path.display().to_string(), missing), how)
        };
        if let Some(go) = &self.go {
            return named(go, "--go");
        }
        match std::env::var_os("FERRY_GO").filter(|v| !v.is_empty()) {
            Some(go) => named(Path::new(&go), "FERRY_GO"),
            None => (GO, "PATH"),
        }
    }
}

/// The environment every Go build for the devices runs with: Linux, ARMv7
/// with hardware floating point, no cgo so the result is static and needs
/// nothing from the device's libc, and the toolchain chosen, never one Go
/// would download by itself (a module that needs a newer Go says so).
pub const GO_ENV: [(&str, &str); 5] = [
    ("GOOS", "linux"),
    ("GOARCH", "arm"),
    ("GOARM", "7"),
    ("CGO_ENABLED", "0"),
    ("GOTOOLCHAIN", "local"),
];

/// Builds the Go module in `request.source` for the devices and packages it
/// into `out_dir`. The program's `main.version` and `main.commit` are set to
/// the release version and the source's git commit; `-s -w` drops the
/// symbol table and DWARF (Go's runtime still symbolises its own panics).
pub fn build_go(
    request: &BuildRequest,
    settings: &GoBuild,
    out_dir: &Path,
) -> Result<Built, BuildError> {
    if !request.source.join("go.mod").is_file() {
        return Err(BuildError::Source {
            dir: request.source.clone(),
            reason: "no go.mod: `ferry build go` builds a Go module (create one with `go mod init NAME`)".into(),
        });
    }
    let (go, chosen) = settings.toolchain();
    let compiler = go.first_line(["env", "GOVERSION"])?;
    let commit = tool::git_commit(&request.source);
    let mut stamps = vec![format!("-X main.version={}", request.version)];
    if let Some(commit) = &commit {
        stamps.push(format!("-X main.commit={commit}"));
    }
    let ldflags = format!("-s -w {}", stamps.join(" "));

    let stage = Stage::new(request, out_dir)?;
    let build = |ldflags: &str, output: &Path| {
        let mut command = go.command();
        command
            .current_dir(&request.source)
            .envs(GO_ENV)
            .args(["build", "-trimpath", "-buildvcs=false", "-ldflags"])
            .arg(ldflags)
            .arg("-o")
            .arg(output)
            .arg(&settings.package);
        go.run(&mut command)
    };
    build(&ldflags, &stage.program).map_err(|e| needs_newer_go(e, &compiler))?;
    stage.check_program()?;
    // The linker ignores `-X` for a constant or a variable that does not
    // exist: an unstripped link of the same build tells which took.
    let unstripped = stage.scratch.path().join("stamp-check");
    build(&stamps.join(" "), &unstripped)?;
    let symbols = go.run(go.command().args(["tool", "nm"]).arg(&unstripped))?;
    let warnings = unstamped(&String::from_utf8_lossy(&symbols), commit.is_some());

    let env: Vec<String> = GO_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let flags = format!("{} -trimpath -ldflags='{ldflags}'", env.join(" "));
    let compiler = format!("{compiler} ({} from {chosen})", go.program);
    let (packaged, program_size, helper_debug_files) = stage.finish(
        request,
        ArtifactKind::Go,
        build_info(request, compiler, flags, commit),
        out_dir,
    )?;
    Ok(Built {
        packaged,
        debug_file: None,
        helper_debug_files,
        program_size,
        warnings,
    })
}

/// Go's words when a module wants a newer Go than the one it ran, with how
/// to choose another.
fn needs_newer_go(error: BuildError, compiler: &str) -> BuildError {
    match error {
        BuildError::ToolFailed {
            program,
            command,
            status,
            output,
        } if output.contains("unknown directive: toolchain")
            || output.contains("requires go >=")
            || output.contains("go.mod requires go") =>
        {
            BuildError::ToolFailed {
                program,
                command,
                status,
                output: format!(
                    "{output}
this module needs a newer Go than {compiler}: name one with `ferry build go --go PATH` or FERRY_GO"
                ),
            }
        }
        other => other,
    }
}

/// What `go tool nm` shows of the stamped variables: a warning for each
/// that is not a string variable of package main.
fn unstamped(symbols: &str, commit: bool) -> Vec<String> {
    let defined = |name: &str| {
        symbols.lines().any(|line| {
            let mut fields = line.split_whitespace().rev();
            fields.next() == Some(name)
                && matches!(fields.next(), Some("D" | "B" | "R" | "d" | "b" | "r"))
        })
    };
    let mut warnings = Vec::new();
    let wanted = [("main.version", true), ("main.commit", commit)];
    for (variable, stamped) in wanted {
        if stamped && !defined(variable) {
            warnings.push(format!(
                "-X {variable}=... had no effect: package main has no string variable `{}` (a `const`, or none), so the program does not carry this value; declare `var {}` to have it stamped",
                variable.trim_start_matches("main."),
                variable.trim_start_matches("main."),
            ));
        }
    }
    warnings
}
