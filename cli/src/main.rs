//! The `cairn` binary: parses arguments and calls the libraries. See `cairn --help`.

/// Every request allocates a little (a spawned task, a frame, a completion), in every process
/// on its path; glibc's malloc spent ~8% of all the cluster's CPU on them (its aligned
/// allocations for tokio's task cells, and consolidating freed chunks), mimalloc a fraction.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cairn_cli::main()
}
