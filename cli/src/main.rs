//! The `cairn` binary: parses arguments and calls the libraries. See `cairn --help`.

fn main() -> std::process::ExitCode {
    cairn_cli::main()
}
