//! Output: logs to stderr, results to stdout (text, or one JSON object per line), exit codes.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Logs go to stderr; `RUST_LOG` overrides the default of warnings plus mesh's own info lines.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,mesh_node=info,mesh=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `println!` that hands a failed write back to the caller (as `?` would) instead of
/// panicking, so `mesh infer … | head` ends quietly when the pipe closes.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            return Err(anyhow::Error::from(e));
        }
    }};
}

/// `print!` and a flush, with [`outln!`]'s handling of a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = write!(stdout, $($arg)*).and_then(|()| stdout.flush()) {
            return Err(anyhow::Error::from(e));
        }
    }};
}

/// Prints one JSON object as a line on stdout.
pub fn json_line(value: &serde_json::Value) -> anyhow::Result<()> {
    outln!("{value}");
    Ok(())
}

/// True when `err` is a write to a pipe whose reader went away: the reader has what it
/// wanted, so the command ends quietly (as ripgrep does).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Exit codes, one per kind of failure a script may want to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Anything not covered below, including internal errors on the serving node.
    Failure = 1,
    // 2 is clap's usage error.
    /// No node hosts the model (or the named node does not).
    NotFound = 3,
    Unauthorized = 4,
    Overloaded = 5,
    BadRequest = 6,
    Network = 7,
    DeadlineExceeded = 8,
}

/// An error that carries its exit code.
#[derive(Debug)]
pub struct Failed {
    pub exit: Exit,
    pub message: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failed {}

pub fn failed(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    Failed {
        exit,
        message: message.into(),
    }
    .into()
}

/// Reports an error as one line on stderr and turns it into the exit code. The message may
/// come from a remote node, so its control characters are escaped.
pub fn fail(err: &anyhow::Error) -> ExitCode {
    let code = err
        .downcast_ref::<Failed>()
        .map_or(Exit::Failure, |f| f.exit);
    let text = format!("{err:#}").replace('\n', " ");
    eprintln!("mesh: error: {}", escape_controls(&text, false));
    ExitCode::from(code as u8)
}

/// Text from elsewhere (a remote card, error or answer), made safe to print on a terminal:
/// control characters (C0, DEL, C1: escape sequences, carriage returns, bells) and the
/// Unicode bidirectional overrides are shown escaped, as `\x1b` or `\u{202e}`, so they
/// cannot move the cursor, recolour or retitle the terminal, or reorder what is shown.
/// A backslash is left alone. With `layout`, newlines and tabs are kept (the text of an
/// answer); without, they are escaped too (one field on one line). `--json` output needs
/// none of this: JSON escapes them itself.
pub fn escape_controls(text: &str, layout: bool) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        let kept = layout && (c == '\n' || c == '\t');
        !kept && (c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_to(mut w: impl std::io::Write) -> anyhow::Result<()> {
        writeln!(w, "x")?;
        Ok(())
    }

    #[test]
    fn control_characters_are_escaped_and_text_is_left_alone() {
        assert!(matches!(
            escape_controls("plain ü → ok \\ \"x\"", false),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_controls("\x1b[31mred\x1b[0m \x1b]0;owned\x07", false),
            "\\x1b[31mred\\x1b[0m \\x1b]0;owned\\x07"
        );
        assert_eq!(
            escape_controls("a\rb\x7f\u{9b}2J", true),
            "a\\x0db\\x7f\\u{9b}2J"
        );
        assert_eq!(escape_controls("abc\u{202e}def", true), "abc\\u{202e}def");
        // An answer keeps its lines and tabs; a one-line field does not.
        assert_eq!(
            escape_controls("line 1\n\tline 2", true),
            "line 1\n\tline 2"
        );
        assert_eq!(
            escape_controls("line 1\n\tline 2", false),
            "line 1\\x0a\\x09line 2"
        );
    }

    #[test]
    fn a_closed_pipe_is_told_apart_from_other_failures() {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let err = write_to(writer).unwrap_err();
        assert!(is_broken_pipe(&err), "{err:#}");
        let wrapped = err.context("printing the answer");
        assert!(is_broken_pipe(&wrapped));
        assert!(!is_broken_pipe(&failed(Exit::Network, "unreachable")));
        let other = anyhow::Error::from(std::io::Error::other("disk full"));
        assert!(!is_broken_pipe(&other));
    }
}
