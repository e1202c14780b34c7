//! Progress bars on a terminal (indicatif), for the library's `Progress`.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::model::progress::Progress;

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn total(&self, n: u64) {
        self.0.set_length(n);
    }

    fn add(&self, n: u64) {
        self.0.inc(n);
    }

    fn done(&self) {
        self.0.finish_and_clear();
    }
}

/// A bar labelled `what` on stderr, if stderr is a terminal.
pub fn bar(what: &str) -> Option<Arc<dyn Progress>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    let template = format!(
        "{{spinner}} {what} {{bytes}}/{{total_bytes}} [{{wide_bar}}] {{binary_bytes_per_sec}} eta {{eta}}"
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        pb.set_style(style);
    }
    Some(Arc::new(Bar(pb)))
}
