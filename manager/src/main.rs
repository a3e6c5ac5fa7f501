//! The `ferry` binary: glue over the library's command line.

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
