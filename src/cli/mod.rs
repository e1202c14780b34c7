//! The command line: the arguments (`args`), one function per command (`run`), what is
//! printed (`render`, `progress`), and how a command ends. An error prints as one line,
//! `drfs: ...`, and the exit code says what kind it was, the same for every command:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failed; a retry may fix it (replica unreachable, disk full, busy, paused) |
//! | 2 | needs an operator (diverged, refused, permission, corrupt) |
//! | 64 | bad usage (`EX_USAGE`): bad or missing arguments, a path that does not exist or is not a drfs store |

pub mod args;
pub mod progress;
pub mod render;
pub mod run;

use clap::{CommandFactory, Parser};

use crate::error::Class;
use args::Cli;

/// `EX_USAGE` from sysexits.h.
pub const EX_USAGE: i32 = 64;

/// The process's name in `ps`, `pgrep`, `top` and systemd: drfs, however it was started
/// (a daemon is this binary run again through /proc/self/exe).
fn name_process() {
    unsafe { libc::prctl(libc::PR_SET_NAME, c"drfs".as_ptr(), 0, 0, 0) };
}

/// clap's message on one line: its first paragraph, without the `error:` prefix.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    first
        .join(" ")
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_string()
}

/// The exit code of a command that failed with `e`.
fn code_of(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(|c| c.downcast_ref::<crate::error::Error>())
        .map_or(Class::Transient.exit_code(), |e| e.class().exit_code())
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    name_process();
    if std::env::args_os().len() <= 1 {
        eprint!("{}", Cli::command().render_usage());
        eprintln!("\nSee drfs --help for the commands.");
        return EX_USAGE;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            eprintln!("drfs: {} (see drfs --help)", one_line(&e));
            return EX_USAGE;
        }
    };
    match run::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drfs: {e:#}");
            code_of(&e)
        }
    }
}
