//! The connection to the fleet's Redis: standalone (`redis://`, `rediss://` for TLS) or a
//! Cluster (a seed list, or `--fleet-cluster`), one blocking connection shared under a mutex and
//! re-made after a failure.
//!
//! Blocking on purpose: the storage seam's calls run on blocking threads (the record writer, the
//! control plane's `storage::blocking`), never on the request path, and a blocking client keeps
//! Cluster, TLS and Lua scripts to one code path. Every call has a timeout, so an unreachable
//! Redis costs a caller at most that long, and answers [`StoreError::Unavailable`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{ConnectionLike, RedisError, RedisResult};

use super::FleetStatus;
use crate::storage::{StoreError, StoreResult};

/// Where the fleet's Redis is and how to reach it.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…`; several for a Cluster's seeds.
    pub urls: Vec<String>,
    /// Talk to a Redis Cluster (implied by several URLs).
    pub cluster: bool,
    /// Connect, read and write timeout of each call.
    pub timeout: Duration,
    /// PEM certificates to trust for `rediss://` instead of the system's roots (a private CA).
    pub ca: Option<std::path::PathBuf>,
}

enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }
}

/// After a failure, how long calls fail at once before one tries again.
pub const RETRY_EVERY: Duration = Duration::from_millis(250);

/// The connection, and since when and why Redis has been unreachable.
struct Link {
    conn: Option<Conn>,
    down: Option<(String, Instant)>,
}

/// The fleet's Redis.
pub struct Redis {
    client: Client,
    /// A plain client of the first node, for subscriptions (a Cluster broadcasts PUBLISH to
    /// every node, so any node's subscribers see every message).
    first: redis::Client,
    conn: Mutex<Link>,
    /// Why Redis is away, while it is: `Link::down`'s message, readable without the connection's
    /// lock, which the one call trying Redis again holds for up to `timeout`.
    away: Mutex<Option<String>>,
    timeout: Duration,
    /// The addresses, without credentials, for messages.
    pub display: String,
    /// Told how every call went (Redis answered, or did not).
    status: Option<Arc<FleetStatus>>,
}

/// Whether an error leaves the connection unusable (the next call connects again).
fn drops_connection(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// An address without its credentials, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

impl Redis {
    /// Parses the settings (no connection is made yet: a Redis that is away at start is a
    /// degraded start, not a failure). A malformed URL is an error naming it.
    pub fn open(settings: &RedisSettings) -> Result<Redis, String> {
        if settings.urls.is_empty() {
            return Err("--fleet-store: no Redis URL".into());
        }
        let display = settings
            .urls
            .iter()
            .map(|u| redact(u))
            .collect::<Vec<_>>()
            .join(",");
        let bad = |u: &str, e: RedisError| format!("--fleet-store {}: {e}", redact(u));
        let ca = match &settings.ca {
            None => None,
            Some(path) => Some(
                std::fs::read(path).map_err(|e| format!("--fleet-ca {}: {e}", path.display()))?,
            ),
        };
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: ca.clone(),
        };
        let open = |u: &str| match &ca {
            None => redis::Client::open(u),
            Some(_) => redis::Client::build_with_tls(u, certs()),
        };
        for u in &settings.urls {
            open(u).map_err(|e| bad(u, e))?;
        }
        let first = open(&settings.urls[0]).map_err(|e| bad(&settings.urls[0], e))?;
        let client = if settings.cluster || settings.urls.len() > 1 {
            let mut builder = redis::cluster::ClusterClientBuilder::new(settings.urls.clone())
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                .retries(1);
            if ca.is_some() {
                builder = builder.certs(certs());
            }
            Client::Cluster(
                builder
                    .build()
                    .map_err(|e| format!("--fleet-store {display}: {e}"))?,
            )
        } else {
            Client::Single(first.clone())
        };
        Ok(Redis {
            client,
            first,
            conn: Mutex::new(Link {
                conn: None,
                down: None,
            }),
            away: Mutex::new(None),
            timeout: settings.timeout,
            display,
            status: None,
        })
    }

    /// The same connection settings, every call reported to `status`.
    pub fn reporting_to(mut self, status: Arc<FleetStatus>) -> Self {
        self.status = Some(status);
        self
    }

    fn reached(&self) {
        if let Some(s) = &self.status {
            s.reached();
        }
    }

    fn lost(&self, error: &str) {
        if let Some(s) = &self.status {
            s.lost(error);
        }
    }

    fn connect(&self) -> RedisResult<Conn> {
        Ok(match &self.client {
            Client::Single(c) => {
                let conn = c.get_connection_with_timeout(self.timeout)?;
                conn.set_read_timeout(Some(self.timeout))?;
                conn.set_write_timeout(Some(self.timeout))?;
                Conn::Single(conn)
            }
            Client::Cluster(c) => Conn::Cluster(Box::new(c.get_connection()?)),
        })
    }

    /// Runs `f` on the connection, connecting first when there is none. A failure drops the
    /// connection (the next call connects again) and is [`StoreError::Unavailable`].
    ///
    /// While Redis is away, calls fail at once, except one every [`RETRY_EVERY`] that tries
    /// again; the others do not wait for it (see [`Redis::link`]).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> StoreResult<T> {
        let mut guard = self.link()?;
        let conn = self.ready(&mut guard)?;
        let r = f(conn.as_dyn());
        self.settle(&mut guard, r)
    }

    /// Sends `cmds` in one pipeline (a Cluster's pipeline splits them by node) and returns their
    /// replies, like [`Redis::with`].
    pub fn pipeline<T: redis::FromRedisValue>(&self, cmds: Vec<redis::Cmd>) -> StoreResult<T> {
        let mut guard = self.link()?;
        let r = match self.ready(&mut guard)? {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
            Conn::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c.as_mut())
            }
        };
        self.settle(&mut guard, r)
    }

    /// The connection's lock. While Redis is away and a call holds it, that call is the one
    /// trying Redis again (for up to the timeout): the others fail at once, as between two tries,
    /// instead of queuing behind it — a control write makes several calls, and under load each
    /// waited behind a retry (a registration took 8.4 s to be refused in a CI run).
    fn link(&self) -> StoreResult<parking_lot::MutexGuard<'_, Link>> {
        if let Some(guard) = self.conn.try_lock() {
            return Ok(guard);
        }
        if let Some(error) = self.away.lock().clone() {
            return Err(StoreError::Unavailable(error));
        }
        Ok(self.conn.lock())
    }

    /// Notes that Redis is away (or, with `None`, back), in the link and where [`Redis::link`]
    /// reads it.
    fn mark_down(&self, link: &mut Link, error: Option<String>) {
        link.down = error.clone().map(|e| (e, Instant::now()));
        *self.away.lock() = error;
    }

    /// The connection to use, or why there is none.
    fn ready<'a>(&self, link: &'a mut Link) -> StoreResult<&'a mut Conn> {
        if let Some((error, since)) = &link.down {
            if since.elapsed() < RETRY_EVERY {
                return Err(StoreError::Unavailable(error.clone()));
            }
        }
        if link.conn.is_none() {
            match self.connect() {
                Ok(c) => link.conn = Some(c),
                Err(e) => {
                    let e = self.unavailable(e);
                    self.mark_down(link, Some(e.to_string()));
                    self.lost(&e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(link.conn.as_mut().expect("connected above"))
    }

    /// Records how a call went.
    fn settle<T>(&self, link: &mut Link, r: RedisResult<T>) -> StoreResult<T> {
        match r {
            Ok(v) => {
                if link.down.is_some() {
                    self.mark_down(link, None);
                }
                self.reached();
                Ok(v)
            }
            Err(e) => {
                let dropped = drops_connection(&e);
                let e = self.unavailable(e);
                if dropped {
                    link.conn = None;
                    self.mark_down(link, Some(e.to_string()));
                    self.lost(&e.to_string());
                } else {
                    // Redis answered, with an error (NOSCRIPT, a script's error…): it is there.
                    self.reached();
                }
                Err(e)
            }
        }
    }

    /// A connection for SUBSCRIBE, whose reads time out after `poll` (so its reader can also
    /// check for changes it missed, and notice when it should stop).
    pub fn subscriber(&self, poll: Duration) -> RedisResult<redis::Connection> {
        let conn = self.first.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(poll))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    fn unavailable(&self, e: RedisError) -> StoreError {
        StoreError::Unavailable(format!("fleet store (Redis at {}): {e}", self.display))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_messages() {
        assert_eq!(
            redact("rediss://fleet:s3cret@redis.internal:6380/0"),
            "rediss://redis.internal:6380/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn a_malformed_url_is_named() {
        let e = Redis::open(&RedisSettings {
            urls: vec!["http://x:1".into()],
            cluster: false,
            timeout: Duration::from_secs(1),
            ca: None,
        })
        .err()
        .unwrap();
        assert!(e.starts_with("--fleet-store http://x:1"), "{e}");
    }
}
