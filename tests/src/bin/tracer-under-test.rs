//! The `tracer` CLI, built inside this package so integration tests can run the real daemon
//! (cargo only exposes `CARGO_BIN_EXE_*` for binaries of the test's own package).
fn main() -> std::process::ExitCode {
    tracer::cli::main()
}
