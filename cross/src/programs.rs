//! The programs of a release against its target, as devices check them,
//! run where releases are made (`ferry package`) and checked offline
//! (`ferry verify --artifact`), so a wrong binary or a script entrypoint is
//! refused there, with the words the device would use, not only on the device.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

use ferry_protocol::elf::{ELF_HEADER_LEN, check_release_file};
use ferry_protocol::{RelPath, Target};

/// Checks every file under `dir`: `entrypoint` must be an ELF program for
/// `target`, any other ELF file must be built for it. Errors name the file.
pub fn check_tree(dir: &Path, entrypoint: &RelPath, target: &Target) -> Result<(), String> {
    let path = dir.join(entrypoint.as_str());
    if !path.is_file() {
        return Err(format!(
            "entrypoint {entrypoint} is not a file in {}",
            dir.display()
        ));
    }
    walk(dir, dir, entrypoint, target)
}

fn walk(dir: &Path, root: &Path, entrypoint: &RelPath, target: &Target) -> Result<(), String> {
    let read_err = |path: &Path, e: io::Error| format!("cannot read {}: {e}", path.display());
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| read_err(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| read_err(&path, e))?;
        if kind.is_dir() {
            walk(&path, root, entrypoint, target)?;
        } else if kind.is_file() {
            let mut header = Vec::with_capacity(ELF_HEADER_LEN);
            File::open(&path)
                .and_then(|f| f.take(ELF_HEADER_LEN as u64).read_to_end(&mut header))
                .map_err(|e| read_err(&path, e))?;
            let name = path.strip_prefix(root).unwrap_or(&path).to_string_lossy();
            check_file(&name, &header, entrypoint, target)?;
        }
    }
    Ok(())
}

/// One file's check, with its name (and "entrypoint") in the error.
fn check_file(
    name: &str,
    header: &[u8],
    entrypoint: &RelPath,
    target: &Target,
) -> Result<(), String> {
    let is_entrypoint = name == entrypoint.as_str();
    check_release_file(header, target, is_entrypoint).map_err(|e| {
        if is_entrypoint {
            format!("entrypoint {name}: {e}")
        } else {
            format!("{name}: {e}")
        }
    })
}

/// Checks the files of a `.tar.gz` artifact (read from `artifact`) the
/// same way, without unpacking it to disk.
pub fn check_artifact(
    artifact: impl Read,
    entrypoint: &RelPath,
    target: &Target,
) -> Result<(), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(artifact));
    let mut found = false;
    let entries = archive
        .entries()
        .map_err(|e| format!("cannot read the artifact: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read the artifact: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| format!("cannot read the artifact: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        found |= name == entrypoint.as_str();
        let mut header = Vec::with_capacity(ELF_HEADER_LEN);
        entry
            .take(ELF_HEADER_LEN as u64)
            .read_to_end(&mut header)
            .map_err(|e| format!("cannot read {name} in the artifact: {e}"))?;
        check_file(&name, &header, entrypoint, target)?;
    }
    if found {
        Ok(())
    } else {
        Err(format!("entrypoint {entrypoint} is not in the artifact"))
    }
}
