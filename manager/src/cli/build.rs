//! `ferry build go|c DIR ...`: cross-compile a service for the ARMv7
//! devices, check the binary as devices will, and package it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_cross::{BuildRequest, Built, CBuild, GoBuild};
use serde_json::json;

use super::Outcome;
use super::package::packaged_outcome;
use super::release_args::{ReleaseArgs, packager};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Args {
    /// Build a Go module: GOOS=linux GOARCH=arm GOARM=7 CGO_ENABLED=0
    /// GOTOOLCHAIN=local, with -X main.version=VERSION and -X main.commit=GIT
    /// (a warning when the program has no such variable).
    Go(GoArgs),
    /// Build C: the directory's Makefile (CC, CFLAGS, LDFLAGS, CROSS_COMPILE,
    /// VERSION, COMMIT set) or else its .c files; debug info kept in OUTDIR/SERVICE-VERSION.debug.
    C(CArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct GoArgs {
    /// The Go module's directory.
    dir: PathBuf,
    #[command(flatten)]
    release: ReleaseArgs,
    /// The main package to build, relative to DIR.
    #[arg(long, default_value = ".")]
    package: String,
    /// The `go` to build with [default: $FERRY_GO, else the first `go` on PATH].
    #[arg(long, value_name = "PATH")]
    go: Option<PathBuf>,
    /// A directory whose contents are added to the release beside bin/ (configuration, assets).
    #[arg(long, value_name = "DIR")]
    files: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CArgs {
    /// The directory with the C sources or the Makefile.
    dir: PathBuf,
    #[command(flatten)]
    release: ReleaseArgs,
    /// Link statically (the program then needs nothing from the device's libc).
    #[arg(long = "static")]
    static_link: bool,
    /// With a Makefile: the program it builds, relative to DIR [default: SERVICE].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Extra compiler flags, added after Ferry's ARMv7 flags.
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    cflags: Option<String>,
    /// A directory whose contents are added to the release beside bin/ (configuration, assets).
    #[arg(long, value_name = "DIR")]
    files: Option<PathBuf>,
}

fn request(dir: PathBuf, release: &ReleaseArgs, files: Option<PathBuf>) -> Result<BuildRequest> {
    Ok(BuildRequest {
        source: dir,
        service: release.service.clone(),
        version: release.version.clone(),
        sequence: release.sequence,
        files,
        expires: release.expires_at()?,
        health: release.health(),
        reload: release.reload.clone(),
        run: release.run()?,
        packager: Some(packager()),
    })
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let (request, out, built) = match args {
        Args::Go(args) => {
            let request = request(args.dir, &args.release, args.files)?;
            let spinner = spinner(&request, "go");
            let built = ferry_cross::build_go(
                &request,
                &GoBuild {
                    package: args.package,
                    go: args.go,
                },
                &args.release.out,
            );
            spinner.finish_and_clear();
            (request, args.release.out, built)
        }
        Args::C(args) => {
            let request = request(args.dir, &args.release, args.files)?;
            let spinner = spinner(&request, "arm-linux-gnueabihf-gcc");
            let built = ferry_cross::build_c(
                &request,
                &CBuild {
                    static_link: args.static_link,
                    binary: args.binary,
                    extra_cflags: args
                        .cflags
                        .iter()
                        .flat_map(|f| f.split_whitespace())
                        .map(str::to_owned)
                        .collect(),
                },
                &args.release.out,
            );
            spinner.finish_and_clear();
            (request, args.release.out, built)
        }
    };
    let built: Built = built.with_context(|| {
        format!(
            "cannot build {} from {} into {}",
            request.service,
            request.source.display(),
            out.display()
        )
    })?;
    let build = &built.packaged.manifest.build;
    let mut outcome = packaged_outcome(
        &built.packaged,
        json!({
            "program_size": built.program_size,
            "debug_file": built.debug_file,
            "helper_debug_files": built.helper_debug_files,
            "compiler": build.compiler,
            "flags": build.flags,
            "git_commit": build.git_commit,
            "warnings": built.warnings,
        }),
    );
    let mut head = format!(
        "built {} {} for {} with {} ({} bytes{})",
        request.service,
        request.version,
        built.packaged.manifest.target,
        build.compiler.as_deref().unwrap_or("?"),
        built.program_size,
        build.git_commit.as_deref().map_or_else(
            || ", no git commit: the source is not in a git work tree".to_owned(),
            |c| format!(", commit {c}")
        ),
    );
    for warning in &built.warnings {
        head.push_str(&format!("\nwarning: {warning}"));
    }
    for debug in built.debug_file.iter().chain(&built.helper_debug_files) {
        head.push_str(&format!(
            "\ndebug info kept in {} (not shipped)",
            debug.display()
        ));
    }
    outcome.prepend_text(&head);
    Ok(outcome)
}

/// A spinner on a terminal while the compiler runs; nothing otherwise.
fn spinner(request: &BuildRequest, compiler: &str) -> indicatif::ProgressBar {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!(
        "building {} {} for armv7 with {compiler}",
        request.service, request.version
    ));
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}
