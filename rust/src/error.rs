//! The one error type of the native core. The Python bindings map each variant to an exception
//! in `ferrotune.errors` (see `py/errors.rs`).

use std::path::PathBuf;

/// Every failure of the native core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or input is malformed: names the file and the place in it (byte offset, line, field).
    #[error("{path}: {place}: {message}")]
    Format {
        path: PathBuf,
        place: String,
        message: String,
    },

    /// An operating-system I/O failure on a path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A caller passed arguments that cannot work together (shapes, dtypes, options).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The work was cancelled (Ctrl-C) before it finished; nothing half-written was left behind.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A [`Error::Format`] for `path` at `place`.
    pub fn format(
        path: impl Into<PathBuf>,
        place: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.into(),
            place: place.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
