//! Target binding: does an executable's ELF header match a target triple?
//!
//! Devices run this on a release's entrypoint before the swap, and the
//! packager runs it before packaging, so a binary built for another machine
//! is refused before it can replace a working one.

use crate::names::Target;

/// Bytes of the header this check reads (the 64-bit ELF header size).
pub const ELF_HEADER_LEN: usize = 64;

/// Why an executable does not fit a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF file at all (a script, say).
    #[error(
        "not an ELF executable (a script? devices start a program built for them: ship the interpreter in the release as the entrypoint and name the script with --arg)"
    )]
    NotElf,
    /// Too short to hold an ELF header.
    #[error("truncated ELF header")]
    Truncated,
    /// Big-endian, where every supported target is little-endian.
    #[error("big-endian ELF, {target} is little-endian")]
    WrongEndian {
        /// The expected target.
        target: Target,
    },
    /// An object file or core dump rather than a program.
    #[error("ELF type {0} is not an executable")]
    NotExecutable(u16),
    /// Built for another processor.
    #[error("built for {found}, but {target} needs {expected}")]
    WrongMachine {
        /// The machine the binary is built for.
        found: String,
        /// The machine the target needs.
        expected: &'static str,
        /// The target.
        target: Target,
    },
    /// 32-bit where 64 is needed or the reverse.
    #[error("{found}-bit ELF, but {target} needs {expected}-bit")]
    WrongClass {
        /// Bits of the binary.
        found: u8,
        /// Bits the target needs.
        expected: u8,
        /// The target.
        target: Target,
    },
    /// An ARM binary for the soft-float ABI on a hard-float target.
    #[error("built for the ARM soft-float ABI, but {target} is hard-float")]
    SoftFloat {
        /// The target.
        target: Target,
    },
    /// A target this check does not know how to match.
    #[error("no ELF rule for target {0}")]
    UnsupportedTarget(Target),
}

/// What a target requires of an ELF header.
struct Rule {
    machine: u16,
    machine_name: &'static str,
    bits: u8,
    hard_float: bool,
}

const EM_386: u16 = 3;
const EM_ARM: u16 = 40;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const EM_RISCV: u16 = 243;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EF_ARM_ABI_FLOAT_SOFT: u32 = 0x200;

fn machine_name(machine: u16) -> String {
    match machine {
        EM_386 => "x86".into(),
        EM_ARM => "ARM".into(),
        EM_X86_64 => "x86-64".into(),
        EM_AARCH64 => "AArch64".into(),
        EM_RISCV => "RISC-V".into(),
        other => format!("ELF machine {other}"),
    }
}

fn rule(target: &Target) -> Option<Rule> {
    let triple = target.as_str();
    let arch = triple.split('-').next().unwrap_or_default();
    let (machine, bits) = match arch {
        "x86_64" => (EM_X86_64, 64),
        "aarch64" => (EM_AARCH64, 64),
        "riscv64gc" | "riscv64" => (EM_RISCV, 64),
        "i586" | "i686" => (EM_386, 32),
        a if a.starts_with("arm") || a.starts_with("thumb") => (EM_ARM, 32),
        _ => return None,
    };
    Some(Rule {
        machine,
        machine_name: match machine {
            EM_X86_64 => "x86-64",
            EM_AARCH64 => "AArch64",
            EM_RISCV => "RISC-V",
            EM_386 => "x86",
            _ => "ARM",
        },
        bits,
        hard_float: machine == EM_ARM && triple.ends_with("hf"),
    })
}

/// Checks one file of a release (its first [`ELF_HEADER_LEN`] bytes, or all
/// of it if shorter) against `target`: the entrypoint must be an ELF
/// program for the target; any other file that is ELF (a helper program, a
/// library) must be built for the target too; anything else is data.
pub fn check_release_file(
    header: &[u8],
    target: &Target,
    entrypoint: bool,
) -> Result<(), ElfError> {
    if !entrypoint && !header.starts_with(b"\x7fELF") {
        return Ok(());
    }
    match check_elf(header, target) {
        // An object file or a core dump in the release is data, not run.
        Err(ElfError::NotExecutable(_)) if !entrypoint => Ok(()),
        other => other,
    }
}

/// Checks the start of an executable (at least [`ELF_HEADER_LEN`] bytes, or
/// the whole file if shorter) against `target`.
pub fn check_elf(header: &[u8], target: &Target) -> Result<(), ElfError> {
    if header.len() < 4 || &header[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if header.len() < 52 {
        return Err(ElfError::Truncated);
    }
    let rule = rule(target).ok_or_else(|| ElfError::UnsupportedTarget(target.clone()))?;
    let bits = match header[4] {
        1 => 32,
        2 => 64,
        _ => return Err(ElfError::Truncated),
    };
    if header[5] != 1 {
        return Err(ElfError::WrongEndian {
            target: target.clone(),
        });
    }
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let e_type = u16_at(16);
    let machine = u16_at(18);
    if machine != rule.machine {
        return Err(ElfError::WrongMachine {
            found: machine_name(machine),
            expected: rule.machine_name,
            target: target.clone(),
        });
    }
    if bits != rule.bits {
        return Err(ElfError::WrongClass {
            found: bits,
            expected: rule.bits,
            target: target.clone(),
        });
    }
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(ElfError::NotExecutable(e_type));
    }
    if rule.hard_float {
        // e_flags sits at 36 in a 32-bit header. Static binaries (Go's among
        // them) may set neither float flag; only an explicit soft-float one
        // is a mismatch.
        let flags = u32::from_le_bytes([header[36], header[37], header[38], header[39]]);
        if flags & EF_ARM_ABI_FLOAT_SOFT != 0 {
            return Err(ElfError::SoftFloat {
                target: target.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::ARMV7_TARGET;

    /// A minimal ELF header with the fields the check reads.
    fn header(bits: u8, machine: u16, e_type: u16, flags: u32) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = if bits == 64 { 2 } else { 1 };
        h[5] = 1;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[36..40].copy_from_slice(&flags.to_le_bytes());
        h
    }

    fn t(s: &str) -> Target {
        Target::new(s).unwrap()
    }

    #[test]
    fn matching_binaries_pass() {
        let arm = t(ARMV7_TARGET);
        assert_eq!(
            check_elf(&header(32, EM_ARM, ET_EXEC, 0x0500_0400), &arm),
            Ok(())
        );
        // Go's static ARM binaries: EABI5, no float flag.
        assert_eq!(
            check_elf(&header(32, EM_ARM, ET_EXEC, 0x0500_0002), &arm),
            Ok(())
        );
        let x86 = t("x86_64-unknown-linux-gnu");
        assert_eq!(check_elf(&header(64, EM_X86_64, ET_DYN, 0), &x86), Ok(()));
    }

    #[test]
    fn wrong_binaries_name_what_is_wrong() {
        let arm = t(ARMV7_TARGET);
        let x86 = t("x86_64-unknown-linux-gnu");
        let e = check_elf(&header(64, EM_X86_64, ET_EXEC, 0), &arm).unwrap_err();
        assert_eq!(
            e.to_string(),
            "built for x86-64, but armv7-unknown-linux-gnueabihf needs ARM"
        );
        let e = check_elf(&header(32, EM_ARM, ET_EXEC, 0x0500_0400), &x86).unwrap_err();
        assert_eq!(
            e.to_string(),
            "built for ARM, but x86_64-unknown-linux-gnu needs x86-64"
        );
        assert!(matches!(
            check_elf(&header(32, EM_ARM, ET_EXEC, 0x0500_0200), &arm),
            Err(ElfError::SoftFloat { .. })
        ));
        assert!(matches!(
            check_elf(&header(64, EM_AARCH64, ET_EXEC, 0), &arm),
            Err(ElfError::WrongMachine { .. })
        ));
        assert!(matches!(
            check_elf(&header(32, EM_X86_64, ET_EXEC, 0), &x86),
            Err(ElfError::WrongClass { .. })
        ));
        assert_eq!(
            check_elf(&header(64, EM_X86_64, 1, 0), &x86),
            Err(ElfError::NotExecutable(1))
        );
        assert_eq!(
            check_elf(b"#!/bin/sh\necho hi\n", &x86),
            Err(ElfError::NotElf)
        );
        assert_eq!(
            check_elf(b"\x7fELF\x02\x01", &x86),
            Err(ElfError::Truncated)
        );
        let mut big_endian = header(64, EM_X86_64, ET_EXEC, 0);
        big_endian[5] = 2;
        assert!(matches!(
            check_elf(&big_endian, &x86),
            Err(ElfError::WrongEndian { .. })
        ));
        assert!(matches!(
            check_elf(
                &header(64, EM_X86_64, ET_EXEC, 0),
                &t("mips-unknown-linux-gnu")
            ),
            Err(ElfError::UnsupportedTarget(_))
        ));
    }

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn this_test_binary_matches_its_own_target() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(
            check_elf(&exe[..ELF_HEADER_LEN], &t("x86_64-unknown-linux-gnu")),
            Ok(())
        );
        assert!(check_elf(&exe[..ELF_HEADER_LEN], &t(ARMV7_TARGET)).is_err());
    }
}
