//! How the vl binaries end: success, or the error and its causes on one line of stderr.

use std::fmt::Display;
use std::process::ExitCode;

/// Turns a binary's result into its exit code, printing `error: ` and the error's alternate
/// form (for `anyhow::Error`, the whole chain of causes joined by `: `, no backtrace).
pub fn exit_code<E: Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
