//! The control socket (`DIR/control.sock` of a pool directory, a per-user runtime directory's
//! for a RADOS pool; mode 0600): volume commands acting online while a server on this host has
//! the pool open. One JSON request per line, one JSON response per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::error::{Error, ErrorKind, Result};
use crate::volume::{AccessChange, NewSize, Volumes};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    List,
    Status,
    Check,
    /// The metadata checker on the last commit (see `Pool::check_committed`).
    CheckMetadata,
    Create {
        name: String,
        size: u64,
        #[serde(default)]
        description: String,
    },
    Snapshot {
        origin: String,
        name: String,
        read_only: bool,
        /// Replaces the default "snapshot of ORIGIN".
        #[serde(default)]
        description: Option<String>,
    },
    Resize {
        name: String,
        size: NewSize,
        /// Allows a shrink (which discards the data past the new end).
        #[serde(default)]
        force: bool,
    },
    Delete {
        name: String,
    },
    Rename {
        name: String,
        new_name: String,
    },
    /// Change who may use a volume.
    Access {
        name: String,
        change: AccessChange,
    },
    /// Grow the pool: data to `data_size` bytes (absent: the data device's size now) and
    /// metadata to `metadata_size` bytes (absent: unchanged).
    Grow {
        data_size: Option<u64>,
        metadata_size: Option<u64>,
    },
}

impl Request {
    /// What the request changes, in words for the log; `None` for requests that only read.
    /// The match lists every request on purpose: a new one must be classified here, so that
    /// every change made through the control socket is logged.
    fn change(&self) -> Option<String> {
        match self {
            Request::List | Request::Status | Request::Check | Request::CheckMetadata => None,
            Request::Create { name, size, .. } => {
                Some(format!("create volume {name:?} of {size} bytes"))
            }
            Request::Snapshot {
                origin,
                name,
                read_only,
                ..
            } => Some(format!(
                "snapshot volume {origin:?} as {name:?}{}",
                if *read_only { " (read-only)" } else { "" }
            )),
            Request::Resize { name, size, force } => Some(format!(
                "resize volume {name:?} to {size}{}",
                if *force { " (--force)" } else { "" }
            )),
            Request::Delete { name } => Some(format!("delete volume {name:?}")),
            Request::Rename { name, new_name } => {
                Some(format!("rename volume {name:?} to {new_name:?}"))
            }
            Request::Access { name, change } => Some(match change {
                AccessChange::Allow(g) => format!(
                    "allow {:?} to use volume {name:?}{}",
                    g.who,
                    if g.read_only { " read-only" } else { "" }
                ),
                AccessChange::Deny(who) => format!("remove {who:?} from volume {name:?}'s access"),
                AccessChange::Clear => format!("open volume {name:?} to every client"),
            }),
            Request::Grow {
                data_size,
                metadata_size,
            } => Some(format!(
                "grow pool: data to {}, metadata to {}",
                data_size.map_or("the device's size".into(), |b| format!("{b} bytes")),
                metadata_size.map_or("(unchanged)".into(), |b| format!("{b} bytes"))
            )),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Err { kind: String, message: String },
}

fn to_value<T: Serialize>(v: T) -> Result<serde_json::Value> {
    serde_json::to_value(v)
        .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("encoding a reply: {e}")))
}

/// Adds the pool's over-commit warning, if any, to the reply of a command that changed volume
/// sizes as a `warnings` list: the CLI prints it (online or offline) and the change's log line
/// carries it.
fn with_warnings(volumes: &Volumes, mut reply: serde_json::Value) -> Result<serde_json::Value> {
    let warnings: Vec<String> = volumes.overcommit_warning().into_iter().collect();
    if let Some(fields) = reply.as_object_mut() {
        fields.insert("warnings".into(), to_value(warnings)?);
    }
    Ok(reply)
}

/// The `warnings` list of a reply (see `with_warnings`); empty when it has none.
pub fn reply_warnings(reply: &serde_json::Value) -> Vec<&str> {
    reply
        .get("warnings")
        .and_then(|w| w.as_array())
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str())
        .collect()
}

/// Executes one request against the open pool (blocking); logs one line for each change.
pub fn execute(volumes: &Volumes, req: Request) -> Result<serde_json::Value> {
    let change = req.change();
    let result = execute_unlogged(volumes, req);
    if let Some(change) = change {
        match &result {
            Ok(reply) => {
                let warnings = reply_warnings(reply);
                if warnings.is_empty() {
                    tracing::info!("control: {change}: done");
                } else {
                    tracing::warn!("control: {change}: done; WARNING: {}", warnings.join("; "));
                }
            }
            Err(e) => tracing::warn!("control: {change}: refused: {e}"),
        }
    }
    result
}

fn execute_unlogged(volumes: &Volumes, req: Request) -> Result<serde_json::Value> {
    match req {
        Request::List => to_value(volumes.list()),
        Request::Status => to_value(volumes.status()),
        Request::Check => to_value(volumes.check_registry()),
        Request::CheckMetadata => to_value(volumes.pool().check_committed()),
        Request::Create {
            name,
            size,
            description,
        } => with_warnings(
            volumes,
            to_value(volumes.create_volume_described(&name, size, &description)?)?,
        ),
        Request::Snapshot {
            origin,
            name,
            read_only,
            description,
        } => with_warnings(
            volumes,
            to_value(volumes.snapshot_described(
                &origin,
                &name,
                read_only,
                description.as_deref(),
            )?)?,
        ),
        Request::Resize { name, size, force } => {
            with_warnings(volumes, to_value(volumes.resize_to(&name, size, force)?)?)
        }
        Request::Rename { name, new_name } => to_value(volumes.rename(&name, &new_name)?),
        Request::Access { name, change } => to_value(volumes.set_access(&name, &change)?),
        Request::Delete { name } => {
            volumes.delete(&name)?;
            to_value(())
        }
        Request::Grow {
            data_size,
            metadata_size,
        } => to_value(volumes.grow(data_size, metadata_size)?),
    }
}

/// Serves the control socket until the task is dropped.
pub async fn serve(listener: tokio::net::UnixListener, volumes: Arc<Volumes>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                continue;
            }
        };
        let volumes = volumes.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Err(e) => Response::Err {
                        kind: "invalid_input".into(),
                        message: format!("bad request: {e}"),
                    },
                    Ok(req) => {
                        let v = volumes.clone();
                        match tokio::task::spawn_blocking(move || execute(&v, req)).await {
                            Ok(Ok(value)) => Response::Ok(value),
                            Ok(Err(e)) => Response::Err {
                                kind: e.kind().name().into(),
                                message: e.message(),
                            },
                            Err(e) => Response::Err {
                                kind: "io".into(),
                                message: format!("request failed: {e}"),
                            },
                        }
                    }
                };
                let Ok(mut text) = serde_json::to_string(&resp) else {
                    break;
                };
                text.push('\n');
                if wr.write_all(text.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Binds the control socket (replacing only a stale one), mode 0600. Done before the server
/// says it is serving, so a volume command run as soon as it does finds the socket.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    crate::util::remove_stale_socket(path)?;
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding control socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
    Ok(listener)
}

/// Sends one request to a running server. `Ok(None)` when no server listens there.
pub fn call(path: &Path, req: &Request) -> Result<Option<serde_json::Value>> {
    call_waiting(path, req, None)
}

/// `call` that waits at most `limit` for the reply: `Ok(None)` also when the server does not
/// answer in time (stopped, say, while another process takes its pool over).
pub fn call_within(
    path: &Path,
    req: &Request,
    limit: std::time::Duration,
) -> Result<Option<serde_json::Value>> {
    call_waiting(path, req, Some(limit))
}

fn call_waiting(
    path: &Path,
    req: &Request,
    limit: Option<std::time::Duration>,
) -> Result<Option<serde_json::Value>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let io = |e| Error::io(format!("talking to {}", path.display()), e);
    stream.set_read_timeout(limit).map_err(io)?;
    let mut line = serde_json::to_string(req)
        .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("encoding request: {e}")))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    match BufReader::new(stream).read_line(&mut reply) {
        Err(e)
            if limit.is_some()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
        {
            return Ok(None)
        }
        read => read.map_err(io)?,
    };
    match serde_json::from_str::<Response>(&reply) {
        Ok(Response::Ok(v)) => Ok(Some(v)),
        Ok(Response::Err { kind, message }) => {
            Err(Error::new(ErrorKind::from_name(&kind), message))
        }
        Err(e) => Err(Error::new(
            ErrorKind::Io,
            format!("bad reply from {}: {e}", path.display()),
        )),
    }
}
