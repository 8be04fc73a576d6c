//! The embedded SQLite database that keeps the audit trail, the sampled requests and each
//! endpoint's router state across restarts. Writes go to one thread of their own, in batches, so a request never waits
//! on the disk; reads (the admin API) use a second connection, which WAL mode lets run
//! beside the writer.
//!
//! The queue to the writer is bounded. When the disk falls behind, a sampled request is
//! dropped and counted (a sample may miss some; the request path must not wait), while a
//! change or a router state waits for room: the audit trail must not lose an entry, and
//! those come from the control plane's blocking thread, admin calls and rare router
//! decisions, never at the rate of requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::clock::{now_ms, rfc3339};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter, types::Value};

/// Writes waiting for the writer at most: beyond, sampled requests are dropped and counted,
/// and changes wait.
const QUEUE: usize = 10_000;

/// Rows written in one transaction at most.
const BATCH: usize = 512;

/// How long the writer gathers sampled requests before writing them in one transaction:
/// one wake-up and one commit per window rather than per request. A change or a flush that
/// comes first is written at once; when a batch is already waiting, nothing is gathered.
const GATHER: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the monitoring database {path}: {source} (set monitoring.database to a writable file, or \"\" to keep nothing)"
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot start the monitoring database's writer thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot read the monitoring database: {0}")]
    Query(#[from] rusqlite::Error),
}

/// One change to what serves, or to how it is chosen. Made with a fixed `kind`; read back
/// from the store with a `String` one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Change<Kind = &'static str> {
    /// `<what>.<how>`: `plugin.loaded`, `model.unloaded`, `endpoint.promote`, `flag.changed`…
    pub kind: Kind,
    /// The admin token's name, `file` for a change on disk, `plugin:<name>` for a router's
    /// own decision, `host` for what the server concluded itself (drift).
    pub actor: String,
    /// The plugin file, model, endpoint or flag changed.
    pub subject: String,
    /// The endpoint concerned, when there is one.
    pub endpoint: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub detail: Option<String>,
}

impl Change {
    /// A change of `kind` to `subject` by `actor`; the other fields by struct update.
    pub fn new(kind: &'static str, actor: impl Into<String>, subject: impl Into<String>) -> Change {
        Change {
            kind,
            actor: actor.into(),
            subject: subject.into(),
            endpoint: None,
            from: None,
            to: None,
            detail: None,
        }
    }
}

/// A change as the store returns it.
#[derive(Debug, serde::Serialize)]
pub struct StoredChange {
    pub id: i64,
    pub at: String,
    pub at_ms: i64,
    #[serde(flatten)]
    pub change: Change<String>,
}

/// One sampled inference request.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RequestRecord {
    pub id: String,
    pub trace_id: Option<String>,
    pub at_ms: u64,
    /// The endpoint or model called.
    pub endpoint: String,
    pub variant: Option<String>,
    pub model: Option<String>,
    pub version: Option<u64>,
    /// Why the variant was chosen.
    pub reason: Option<String>,
    pub flags: BTreeMap<String, String>,
    pub latency_us: u64,
    /// `ok` or `error`.
    pub status: String,
    pub error: Option<String>,
    /// The input and output tensors, when `monitoring.request_payloads` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Box<serde_json::value::RawValue>>,
}

/// An endpoint's router state as last kept, and the router it belongs to: the plugin and
/// its configuration, since a state means nothing to another router or other settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterState {
    pub endpoint: String,
    pub router: String,
    pub state: String,
}

/// Which rows a read wants: all filters optional, newest first, `limit` per page.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub endpoint: Option<String>,
    /// A kind (`plugin.loaded`) or its first part (`plugin`).
    pub kind: Option<String>,
    pub subject: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only rows older than this id: the `next` of the previous page.
    pub before: Option<i64>,
    pub limit: usize,
}

/// One page of rows and the cursor of the next, if there are more.
#[derive(Debug, serde::Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<i64>,
}

enum Write {
    Change { at_ms: u64, change: Change },
    RouterState(RouterState),
    Request(RequestRecord),
    Flush(Sender<()>),
}

pub struct Store {
    writes: SyncSender<Write>,
    pending: Arc<AtomicUsize>,
    reads: Mutex<Connection>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    subject TEXT NOT NULL,
    endpoint TEXT,
    from_value TEXT,
    to_value TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS changes_at ON changes (at_ms);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    request_id TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at_ms);
CREATE TABLE IF NOT EXISTS router_states (
    endpoint TEXT PRIMARY KEY,
    router TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
";

impl Store {
    /// Opens (or creates) the database and starts its writer.
    pub fn open(path: &Path, retention: u64) -> Result<Store, StoreError> {
        let open = |flags| {
            Connection::open_with_flags(path, flags).map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })
        };
        let writer = open(OpenFlags::default())?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let reads = open(OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        // The writer holds the lock only briefly; a read waits for it rather than fail.
        reads
            .busy_timeout(Duration::from_secs(2))
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let (writes, queue) = std::sync::mpsc::sync_channel(QUEUE);
        let pending = Arc::new(AtomicUsize::new(0));
        let counted = pending.clone();
        std::thread::Builder::new()
            .name("modelyard-store".to_string())
            .spawn(move || write(writer, &queue, &counted, retention))
            .map_err(StoreError::Thread)?;
        Ok(Store {
            writes,
            pending,
            reads: Mutex::new(reads),
        })
    }

    /// Queues `write`, waiting for room; `false` when the writer has stopped.
    fn send(&self, write: Write) -> bool {
        self.writes.send(write).is_ok()
    }

    /// Queues a change; changes are never dropped (a full queue makes the caller wait).
    pub fn change(&self, at_ms: u64, change: Change) {
        if !self.send(Write::Change { at_ms, change }) {
            tracing::error!(
                "the monitoring database's writer has stopped; a change went unrecorded (it is in the log)"
            );
        }
    }

    /// Queues an endpoint's new router state; the newest one per endpoint is kept.
    pub fn router_state(&self, state: RouterState) {
        if !self.send(Write::RouterState(state)) {
            tracing::error!(
                "the monitoring database's writer has stopped; a router state was not kept (a restart will start that endpoint's strategy afresh)"
            );
        }
    }

    /// The state kept for `endpoint`'s router, if it was kept for this very `router`.
    pub fn kept_router_state(
        &self,
        endpoint: &str,
        router: &str,
    ) -> Result<Option<String>, StoreError> {
        // Read at start, before this process writes any: no flush to wait for.
        let reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        let state = reads
            .prepare_cached("SELECT state FROM router_states WHERE endpoint = ?1 AND router = ?2")?
            .query_row(rusqlite::params![endpoint, router], |row| row.get(0))
            .optional()?;
        Ok(state)
    }

    /// Queues a sampled request; `false` when it was dropped because the writer is behind.
    pub fn request(&self, record: RequestRecord) -> bool {
        self.pending.fetch_add(1, Ordering::Relaxed);
        match self.writes.try_send(Write::Request(record)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Waits (a second at most) until everything queued before this call is written, so
    /// that a read sees the changes that led to it.
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.send(Write::Flush(done)) {
            let _ = wait.recv_timeout(Duration::from_secs(1));
        }
    }

    /// Changes matching `query`, newest first.
    pub fn changes(&self, query: &Query) -> Result<Page<StoredChange>, StoreError> {
        self.flush();
        let reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        let (clause, values) = where_clause(query, true);
        let sql = format!(
            "SELECT id, at_ms, kind, actor, subject, endpoint, from_value, to_value, detail
             FROM changes {clause} ORDER BY id DESC LIMIT {}",
            query.limit + 1
        );
        let mut statement = reads.prepare(&sql)?;
        let rows = statement.query_map(params_from_iter(values), |row| {
            let at_ms: i64 = row.get(1)?;
            Ok(StoredChange {
                id: row.get(0)?,
                at: rfc3339(at_ms),
                at_ms,
                change: Change {
                    kind: row.get(2)?,
                    actor: row.get(3)?,
                    subject: row.get(4)?,
                    endpoint: row.get(5)?,
                    from: row.get(6)?,
                    to: row.get(7)?,
                    detail: row.get(8)?,
                },
            })
        })?;
        let items = rows.collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, query.limit, |c| c.id))
    }

    /// Sampled requests matching `query` (endpoint and time filters), newest first.
    pub fn requests(&self, query: &Query) -> Result<Page<(i64, RequestRecord)>, StoreError> {
        self.flush();
        let reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        let (clause, values) = where_clause(query, false);
        let sql = format!(
            "SELECT id, record FROM requests {clause} ORDER BY id DESC LIMIT {}",
            query.limit + 1
        );
        let mut statement = reads.prepare(&sql)?;
        let rows = statement.query_map(params_from_iter(values), |row| {
            let text: String = row.get(1)?;
            Ok((row.get::<_, i64>(0)?, text))
        })?;
        let mut items = Vec::new();
        for row in rows {
            let (id, text) = row?;
            // A record this version cannot read is skipped rather than fail the page.
            if let Ok(record) = serde_json::from_str(&text) {
                items.push((id, record));
            }
        }
        Ok(page(items, query.limit, |(id, _)| *id))
    }
}

fn page<T>(mut items: Vec<T>, limit: usize, id: impl Fn(&T) -> i64) -> Page<T> {
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(id) } else { None };
    Page { items, next }
}

fn where_clause(query: &Query, changes: bool) -> (String, Vec<Value>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    let mut add = |condition: &str, value: Vec<Value>| {
        conditions.push(condition.to_string());
        values.extend(value);
    };
    let text = |t: &String| Value::Text(t.clone());
    if let Some(endpoint) = &query.endpoint {
        add("endpoint = ?", vec![text(endpoint)]);
    }
    if let (true, Some(kind)) = (changes, &query.kind) {
        // `model` matches `model` and `model.*`; LIKE's wildcards in the kind are literal.
        let escaped = kind
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let prefix = Value::Text(format!("{escaped}.%"));
        add(
            "(kind = ? OR kind LIKE ? ESCAPE '\\')",
            vec![text(kind), prefix],
        );
    }
    if let (true, Some(subject)) = (changes, &query.subject) {
        add("subject = ?", vec![text(subject)]);
    }
    if let Some(since) = query.since_ms {
        add("at_ms >= ?", vec![Value::Integer(since)]);
    }
    if let Some(until) = query.until_ms {
        add("at_ms <= ?", vec![Value::Integer(until)]);
    }
    if let Some(before) = query.before {
        add("id < ?", vec![Value::Integer(before)]);
    }
    if conditions.is_empty() {
        (String::new(), values)
    } else {
        (format!("WHERE {}", conditions.join(" AND ")), values)
    }
}

fn write(mut db: Connection, queue: &Receiver<Write>, pending: &AtomicUsize, retention: u64) {
    let mut since_prune = 0u64;
    while let Ok(first) = queue.recv() {
        if matches!(first, Write::Request(_)) && pending.load(Ordering::Relaxed) < BATCH {
            std::thread::sleep(GATHER);
        }
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut flushed = Vec::new();
        let mut requests = 0;
        let written = (|| -> rusqlite::Result<()> {
            let tx = db.transaction()?;
            for write in batch {
                match write {
                    Write::Change { at_ms, change } => {
                        tx.prepare_cached(
                            "INSERT INTO changes (at_ms, kind, actor, subject, endpoint, from_value, to_value, detail)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )?
                        .execute(rusqlite::params![
                                at_ms as i64, change.kind, change.actor, change.subject,
                                change.endpoint, change.from, change.to, change.detail
                            ])?;
                    }
                    Write::RouterState(kept) => {
                        tx.prepare_cached(
                            "INSERT INTO router_states (endpoint, router, state, at_ms) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (endpoint) DO UPDATE SET router = ?2, state = ?3, at_ms = ?4",
                        )?
                        .execute(rusqlite::params![
                            kept.endpoint, kept.router, kept.state, now_ms() as i64
                        ])?;
                    }
                    Write::Request(record) => {
                        requests += 1;
                        let text = serde_json::to_string(&record).unwrap_or_default();
                        tx.prepare_cached(
                            "INSERT INTO requests (at_ms, endpoint, request_id, record) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(rusqlite::params![record.at_ms as i64, record.endpoint, record.id, text])?;
                    }
                    Write::Flush(done) => flushed.push(done),
                }
            }
            since_prune += requests as u64;
            if since_prune >= 1000 {
                since_prune = 0;
                tx.execute(
                    "DELETE FROM requests WHERE id <= (SELECT MAX(id) FROM requests) - ?1",
                    [retention as i64],
                )?;
            }
            tx.commit()
        })();
        pending.fetch_sub(requests, Ordering::Relaxed);
        if let Err(error) = written {
            tracing::error!(%error, "cannot write to the monitoring database; these records are only in the log");
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: &'static str, subject: &str) -> Change {
        Change {
            to: Some("x".to_string()),
            ..Change::new(kind, "file", subject)
        }
    }

    #[test]
    fn a_full_queue_drops_requests_and_makes_changes_wait() {
        // A store whose writer is held back: the test drains the queue itself.
        let (writes, queue) = std::sync::mpsc::sync_channel(QUEUE);
        let store = Arc::new(Store {
            writes,
            pending: Arc::new(AtomicUsize::new(0)),
            reads: Mutex::new(Connection::open_in_memory().unwrap()),
        });
        let record = RequestRecord::default();
        assert!((0..QUEUE).all(|_| store.request(record.clone())));
        assert!(!store.request(record), "dropped when full");
        assert_eq!(store.pending.load(Ordering::Relaxed), QUEUE);
        let writer = store.clone();
        let change = std::thread::spawn(move || writer.change(1, change("plugin.loaded", "x")));
        // The change waits for room rather than being lost: it comes after every request.
        let received: Vec<Write> = (0..=QUEUE).map(|_| queue.recv().unwrap()).collect();
        change.join().unwrap();
        assert!(
            received[..QUEUE]
                .iter()
                .all(|w| matches!(w, Write::Request(_)))
        );
        assert!(matches!(
            &received[QUEUE],
            Write::Change { change, .. } if change.subject == "x"
        ));
    }

    #[test]
    fn changes_survive_reopening_and_filter_and_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        {
            let store = Store::open(&path, 10).unwrap();
            store.change(1_000, change("plugin.loaded", "weighted"));
            store.change(2_000, change("model.loaded", "iris"));
            store.change(3_000, change("model.unloaded", "iris"));
            store.flush();
        }
        let store = Store::open(&path, 10).unwrap();
        store.change(4_000, change("plugin_x.loaded", "other"));
        let all = store
            .changes(&Query {
                limit: 10,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(all.items.len(), 4);
        let models = store
            .changes(&Query {
                kind: Some("model".into()),
                limit: 1,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(models.items[0].change.kind, "model.unloaded");
        let rest = store
            .changes(&Query {
                kind: Some("model".into()),
                limit: 1,
                before: models.next,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(rest.items[0].change.kind, "model.loaded");
        assert_eq!(rest.next, None);
        // `_` is not a wildcard: "plugin" does not match "plugin_x.loaded".
        let plugins = store
            .changes(&Query {
                kind: Some("plugin".into()),
                limit: 10,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(plugins.items.len(), 1);
        let window = store
            .changes(&Query {
                since_ms: Some(2_000),
                until_ms: Some(3_000),
                limit: 10,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(window.items.len(), 2);
        assert_eq!(window.items[0].at, "1970-01-01T00:00:03Z");
    }
}
