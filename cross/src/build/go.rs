//! `ferry build go`: a static ARMv7 Go program, stamped with its version.

use std::path::Path;

use ferry_protocol::manifest::ArtifactKind;

use super::tool::{self, GO};
use super::{BuildError, BuildRequest, Built, Stage, build_info};

/// Go-specific build settings.
#[derive(Debug, Clone)]
pub struct GoBuild {
    /// The main package to build, relative to the module (`.` by default).
    pub package: String,
}

impl Default for GoBuild {
    fn default() -> Self {
        Self {
            package: ".".into(),
        }
    }
}

/// The environment every Go build for the devices runs with: Linux, ARMv7
/// with hardware floating point, and no cgo so the result is static and
/// needs nothing from the device's libc.
pub const GO_ENV: [(&str, &str); 4] = [
    ("GOOS", "linux"),
    ("GOARCH", "arm"),
    ("GOARM", "7"),
    ("CGO_ENABLED", "0"),
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
    let compiler = GO.first_line(["env", "GOVERSION"])?;
    let commit = tool::git_commit(&request.source);
    let mut ldflags = format!("-s -w -X main.version={}", request.version);
    if let Some(commit) = &commit {
        ldflags.push_str(&format!(" -X main.commit={commit}"));
    }

    let stage = Stage::new(request, out_dir)?;
    let mut go = GO.command();
    go.current_dir(&request.source)
        .envs(GO_ENV)
        .args(["build", "-trimpath", "-buildvcs=false", "-ldflags"])
        .arg(&ldflags)
        .arg("-o")
        .arg(&stage.program)
        .arg(&settings.package);
    GO.run(&mut go)?;
    stage.check_program()?;

    let env: Vec<String> = GO_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let flags = format!("{} -trimpath -ldflags='{ldflags}'", env.join(" "));
    let (packaged, program_size) = stage.finish(
        request,
        ArtifactKind::Go,
        build_info(request, compiler, flags, commit),
        out_dir,
    )?;
    Ok(Built {
        packaged,
        debug_file: None,
        program_size,
    })
}
