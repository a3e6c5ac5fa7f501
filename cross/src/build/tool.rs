//! Running the toolchains a build needs, with errors that say what to install.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use super::BuildError;

/// An external program a build runs, and what to do when it is missing.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    pub program: Cow<'static, str>,
    pub missing: Cow<'static, str>,
}

const fn debian(program: &'static str, package: &'static str) -> Tool {
    Tool {
        program: Cow::Borrowed(program),
        missing: Cow::Borrowed(package),
    }
}

pub(crate) const GO: Tool = debian("go", "golang-go");
pub(crate) const ARM_GCC: Tool = debian("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf");
pub(crate) const ARM_OBJCOPY: Tool = debian(
    "arm-linux-gnueabihf-objcopy",
    "binutils-arm-linux-gnueabihf",
);
pub(crate) const MAKE: Tool = debian("make", "make");

impl Tool {
    /// A program named by the user (`--go PATH`): what is missing is that path.
    pub fn at(program: String, missing: String) -> Self {
        Self {
            program: Cow::Owned(program),
            missing: Cow::Owned(missing),
        }
    }

    fn hint(&self) -> String {
        if self.missing.contains(' ') {
            self.missing.to_string()
        } else {
            format!("install it (on Debian: apt-get install {})", self.missing)
        }
    }

    /// A command for this tool.
    pub fn command(&self) -> Command {
        Command::new(self.program.as_ref())
    }

    /// Runs `command` (made by [`Tool::command`]) to completion and returns
    /// its stdout; a missing program or a failure becomes a [`BuildError`]
    /// carrying the end of what it printed.
    pub fn run(&self, command: &mut Command) -> Result<Vec<u8>, BuildError> {
        let output = command.output().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                BuildError::ToolMissing {
                    program: self.program.to_string(),
                    hint: self.hint(),
                }
            } else {
                BuildError::Io {
                    path: self.program.as_ref().into(),
                    error,
                }
            }
        })?;
        check(self, command, output)
    }

    /// The first line `PROGRAM ARGS` prints, trimmed (a version, say).
    pub fn first_line<I, S>(&self, args: I) -> Result<String, BuildError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stdout = self.run(self.command().args(args))?;
        Ok(String::from_utf8_lossy(&stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned())
    }
}

fn check(tool: &Tool, command: &Command, output: Output) -> Result<Vec<u8>, BuildError> {
    if output.status.success() {
        return Ok(output.stdout);
    }
    let mut printed = String::from_utf8_lossy(&output.stderr).into_owned();
    printed.push_str(&String::from_utf8_lossy(&output.stdout));
    Err(BuildError::ToolFailed {
        program: tool.program.to_string(),
        command: describe(command),
        status: output.status.to_string(),
        output: tail(&printed, 40),
    })
}

/// The command line as a person would type it (arguments only, no environment).
pub(crate) fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    words.join(" ")
}

/// The last `lines` lines of `text`: compiler errors end with what matters.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// The source's git commit, with `-dirty` when tracked files have changed;
/// `None` when the source is not in a git work tree (or git is absent).
pub(crate) fn git_commit(dir: &Path) -> Option<String> {
    let run = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = run(&["rev-parse", "--verify", "--quiet", "HEAD"])?;
    if commit.is_empty() {
        return None;
    }
    let changed = run(&["status", "--porcelain", "--untracked-files=no"])?;
    Some(if changed.is_empty() {
        commit
    } else {
        format!("{commit}-dirty")
    })
}
