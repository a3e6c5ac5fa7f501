//! Keeping a C program's debug info apart from the program that ships.
//!
//! The usual GNU way: copy the DWARF sections into a `.debug` file, strip
//! them from the program, and leave a `.gnu_debuglink` section naming the
//! file (with its CRC) so gdb and addr2line find it beside the program or
//! under `/usr/lib/debug`.

use std::path::Path;

use super::BuildError;
use super::tool::ARM_OBJCOPY;

/// Moves `program`'s debug info into `debug_file`.
pub(crate) fn split(program: &Path, debug_file: &Path) -> Result<(), BuildError> {
    ARM_OBJCOPY.run(
        ARM_OBJCOPY
            .command()
            .arg("--only-keep-debug")
            .arg(program)
            .arg(debug_file),
    )?;
    let mut link = std::ffi::OsString::from("--add-gnu-debuglink=");
    link.push(debug_file);
    ARM_OBJCOPY.run(
        ARM_OBJCOPY
            .command()
            .arg("--strip-debug")
            .arg(link)
            .arg(program),
    )?;
    Ok(())
}
