//! Listeners: the local Unix socket (bound here, or taken from systemd), and
//! who is on the other end of each accepted connection.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use airgate_policy::identity::{Identity, UnixPeer};
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};

use crate::config::UnixListenerConfig;
use crate::systemd::ActivatedFds;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{path}: the directory {dir} does not exist")]
    NoParent { path: PathBuf, dir: PathBuf },
    #[error("{path}: another process is already listening on it")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("passed socket {name:?} (fd {fd}): {source}")]
    Activated {
        name: String,
        fd: i32,
        #[source]
        source: io::Error,
    },
}

/// What /admin/status shows of a listener.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub kind: &'static str,
    pub address: String,
    /// True when systemd passed the socket (socket activation).
    pub activated: bool,
}

/// The daemon's bound Unix socket.
pub struct UnixSocket {
    pub listener: UnixListener,
    pub info: ListenerInfo,
    /// The node to remove at shutdown; None for sockets systemd owns.
    cleanup: Option<PathBuf>,
}

/// Every listener the server accepts on.
pub struct Listeners {
    pub unix: UnixSocket,
    pub tls: Option<TcpSocket>,
}

/// The TCP socket of the mutual-TLS listener.
pub struct TcpSocket {
    pub listener: tokio::net::TcpListener,
    pub info: ListenerInfo,
}

impl TcpSocket {
    /// Takes the socket systemd passed under the configured name, or binds the address.
    pub async fn open(
        config: &crate::config::TlsListenerConfig,
        activated: &mut ActivatedFds,
    ) -> Result<Self, ListenerError> {
        let (listener, activated) = if let Some(fd) = activated.claim(&config.fd_name) {
            let activated_err = |source| ListenerError::Activated {
                name: config.fd_name.clone(),
                fd,
                source,
            };
            let std = crate::sys::adopt_tcp_listener(fd).map_err(activated_err)?;
            std.set_nonblocking(true).map_err(activated_err)?;
            (
                tokio::net::TcpListener::from_std(std).map_err(activated_err)?,
                true,
            )
        } else {
            let listener = tokio::net::TcpListener::bind(config.address)
                .await
                .map_err(|source| ListenerError::Io {
                    path: PathBuf::from(config.address.to_string()),
                    action: "bind",
                    source,
                })?;
            (listener, false)
        };
        let address = listener
            .local_addr()
            .map_or_else(|_| config.address.to_string(), |a| a.to_string());
        Ok(Self {
            listener,
            info: ListenerInfo {
                name: config.fd_name.clone(),
                kind: "tls",
                address,
                activated,
            },
        })
    }
}

impl UnixSocket {
    /// Takes the socket systemd passed under the configured name, or binds
    /// the configured path with the configured mode and group.
    pub fn open(
        config: &UnixListenerConfig,
        activated: &mut ActivatedFds,
    ) -> Result<Self, ListenerError> {
        if let Some(fd) = activated.claim(&config.fd_name) {
            let activated_err = |source| ListenerError::Activated {
                name: config.fd_name.clone(),
                fd,
                source,
            };
            let std = crate::sys::adopt_unix_listener(fd).map_err(activated_err)?;
            std.set_nonblocking(true).map_err(activated_err)?;
            let address = std
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "(unnamed)".to_owned());
            let listener = UnixListener::from_std(std).map_err(activated_err)?;
            return Ok(Self {
                listener,
                info: ListenerInfo {
                    name: config.fd_name.clone(),
                    kind: "unix",
                    address,
                    activated: true,
                },
                cleanup: None,
            });
        }
        let listener = bind(config)?;
        Ok(Self {
            listener,
            info: ListenerInfo {
                name: config.fd_name.clone(),
                kind: "unix",
                address: config.path.display().to_string(),
                activated: false,
            },
            cleanup: Some(config.path.clone()),
        })
    }

    /// Removes the socket node if this process created it.
    pub fn remove_node(&self) {
        if let Some(path) = &self.cleanup
            && let Err(e) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove socket");
        }
    }
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> ListenerError {
    let path = path.to_owned();
    move |source| ListenerError::Io {
        path,
        action,
        source,
    }
}

/// socket() + bind() + chmod + chown + listen(): nobody can connect before the
/// node has its final mode and group.
fn bind(config: &UnixListenerConfig) -> Result<UnixListener, ListenerError> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, socket};
    let path = &config.path;
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        return Err(ListenerError::NoParent {
            path: path.clone(),
            dir: dir.to_owned(),
        });
    }
    remove_stale(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err(path, "socket")(e.into()))?;
    let addr = UnixAddr::new(path.as_path()).map_err(|e| io_err(path, "address")(e.into()))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(|e| io_err(path, "bind")(e.into()))?;
    let finish = || -> Result<(), ListenerError> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
            .map_err(io_err(path, "chmod"))?;
        if let Some(gid) = config.group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err(path, "chown"))?;
        }
        nix::sys::socket::listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| io_err(path, "listen")(e.into()))?;
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let std = std::os::unix::net::UnixListener::from(fd);
    UnixListener::from_std(std).map_err(io_err(path, "register"))
}

/// A socket node left by a crashed daemon is removed; a live one, or a file
/// that is not a socket, is left alone and reported.
fn remove_stale(path: &Path) -> Result<(), ListenerError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "stat")(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(ListenerError::NotASocket {
            path: path.to_owned(),
        }),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(ListenerError::InUse {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path).map_err(io_err(path, "remove stale socket"))
            }
            Err(e) => Err(io_err(path, "probe existing socket")(e)),
        },
    }
}

/// The kernel's record of who connected: SO_PEERCRED and SO_PEERGROUPS.
pub fn peer_identity(stream: &UnixStream) -> io::Result<Identity> {
    let cred = stream.peer_cred()?;
    let groups = crate::sys::peer_groups(stream.as_fd())?;
    Ok(Identity::Unix(UnixPeer::new(
        cred.uid(),
        cred.gid(),
        cred.pid(),
        groups,
    )))
}
