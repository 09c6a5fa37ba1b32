//! A registry file opened without trusting it.
//!
//! The file may have been damaged outside redb (a bad disk, a stray `dd`, a half-copied
//! backup). Opening it must end in either a usable database or a [`RegistryError`] that
//! names the file, never a panic. So every open runs redb's integrity check
//! ([`redb::Builder::set_check_integrity_on_open`]: the checksum of every page is verified
//! and what redb can repair is repaired, the rest is reported as corrupt), any panic redb
//! raises on pages it does not verify is contained and reported as corruption ([`contain`]),
//! and rows are read as raw bytes ([`RawKey`]): a key or value that does not decode is
//! listed in [`Scan::unreadable`] instead of being unwrapped. The same open serves the
//! controller and the `dbgpt registry` commands.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::HashSet;
use std::io::ErrorKind;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;

use redb::{
    Builder, Database, Key, ReadableDatabase, ReadableTable, TableDefinition, TypeName, Value,
};

use super::super::{Instance, RegistryError, record};
use crate::wire::controller::InstanceKey;

/// The key type of the instances table: `(model_name, host, port)`.
pub(crate) type InstanceRow<'a> = (&'a str, &'a str, u16);

/// `(model_name, host, port)` → versioned record bytes.
pub(crate) const INSTANCES: TableDefinition<InstanceRow, &[u8]> = TableDefinition::new("instances");
/// The instances table with its keys left undecoded (same name and key type on disk).
const RAW_INSTANCES: TableDefinition<RawKey, &[u8]> = TableDefinition::new("instances");
/// Store-level metadata (`schema_version`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Version of the table layout (not of the record format, which is per record).
pub(crate) const SCHEMA_VERSION: u64 = 1;

/// How a registry file is turned into a database, given redb's builder configured for an
/// untrusted file (tests substitute a storage backend that can fail on demand).
pub(crate) type CreateFn =
    dyn Fn(&Builder, &Path) -> Result<Database, redb::DatabaseError> + Send + Sync;

/// Opens (or creates) the file at `path`.
pub(crate) fn create(builder: &Builder, path: &Path) -> Result<Database, redb::DatabaseError> {
    builder.create(path)
}

/// Everything the instances table holds.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Records that decoded, in key order.
    pub instances: Vec<Instance>,
    /// Rows that did not decode: left in the file, never served.
    pub unreadable: Vec<Unreadable>,
}

/// A row of the instances table that did not decode.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unreadable {
    /// The key as far as it can be shown (`model@host:port`, or the raw bytes).
    pub key: String,
    pub error: String,
}

/// Opens the registry file at `path` with `create`, checks redb's integrity, makes sure the
/// tables exist with a layout this build understands, and reads every row.
pub(crate) fn open(path: &Path, create: &CreateFn) -> Result<(Database, Scan), RegistryError> {
    let shown = path.display().to_string();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| RegistryError::Open {
            path: shown.clone(),
            reason: format!("cannot create {}: {e}", parent.display()),
        })?;
    }
    let opened = contain(|| -> Result<(Database, Scan), LayoutError> {
        let mut builder = Builder::new();
        builder.set_check_integrity_on_open(true);
        let db = create(&builder, path)?;
        ensure_layout(&db)?;
        let scan = scan(&db.begin_read()?.open_table(RAW_INSTANCES)?)?;
        Ok((db, scan))
    });
    match opened {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(LayoutError::Redb(e))) => Err(classify(&shown, e)),
        Ok(Err(LayoutError::Newer(v))) => Err(RegistryError::Open {
            path: shown,
            reason: format!(
                "it was written by a newer dbgpt (registry schema {v}, this build knows {SCHEMA_VERSION})"
            ),
        }),
        Err(panic) => Err(RegistryError::Corrupt {
            path: shown,
            reason: format!("redb failed reading it: {panic}"),
        }),
    }
}

/// Why the tables could not be made ready.
enum LayoutError {
    Redb(redb::Error),
    /// A newer dbgpt wrote this schema version.
    Newer(u64),
}

impl<E: Into<redb::Error>> From<E> for LayoutError {
    fn from(e: E) -> Self {
        LayoutError::Redb(e.into())
    }
}

/// Creates both tables if they are missing and refuses a newer table layout.
fn ensure_layout(db: &Database) -> Result<(), LayoutError> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get("schema_version")?.map(|v| v.value());
        match found {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v > SCHEMA_VERSION => return Err(LayoutError::Newer(v)),
            Some(_) => {}
        }
        txn.open_table(INSTANCES)?;
    }
    txn.commit()?;
    Ok(())
}

/// The typed error of a failed open, naming the file.
fn classify(path: &str, e: redb::Error) -> RegistryError {
    let path = path.to_string();
    match e {
        redb::Error::DatabaseAlreadyOpen => RegistryError::Locked { path },
        redb::Error::Corrupted(reason) => RegistryError::Corrupt { path, reason },
        // redb's answer to a file whose header is not redb's (e.g. its magic number).
        redb::Error::Io(e) if e.kind() == ErrorKind::InvalidData => RegistryError::Corrupt {
            path,
            reason: e.to_string(),
        },
        e => RegistryError::Open {
            path,
            reason: e.to_string(),
        },
    }
}

/// Reads every row of an instances table opened with [`RAW_INSTANCES`].
fn scan(table: &impl ReadableTable<RawKey, &'static [u8]>) -> Result<Scan, redb::Error> {
    let mut out = Scan::default();
    for row in table.iter()? {
        let (k, v) = row?;
        let raw_key = k.value();
        match record::decode(v.value()) {
            Ok(inst) if row_key(&inst) == raw_key => out.instances.push(inst),
            Ok(inst) => out.unreadable.push(Unreadable {
                key: show_key(raw_key),
                error: format!("the key does not match its record (for {})", inst.key),
            }),
            Err(e) => out.unreadable.push(Unreadable {
                key: show_key(raw_key),
                error: e.to_string(),
            }),
        }
    }
    Ok(out)
}

/// Makes the file hold exactly `instances` (the in-memory view, which is the truth after a
/// storage error): every instance is written, and every readable row of an instance not in
/// the list is removed. Unreadable rows are left as they are. One durable transaction.
pub(crate) fn resync(
    db: &Database,
    instances: &[(InstanceKey, Vec<u8>)],
) -> Result<(), redb::Error> {
    let written = contain(|| -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        let stale: Vec<InstanceKey> = {
            let keep: HashSet<&InstanceKey> = instances.iter().map(|(k, _)| k).collect();
            scan(&txn.open_table(RAW_INSTANCES)?)?
                .instances
                .into_iter()
                .map(|i| i.key)
                .filter(|k| !keep.contains(k))
                .collect()
        };
        {
            let mut table = txn.open_table(INSTANCES)?;
            for k in &stale {
                table.remove(row(k))?;
            }
            for (k, bytes) in instances {
                table.insert(row(k), bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    });
    written.unwrap_or_else(|panic| Err(redb::Error::Corrupted(format!("redb failed: {panic}"))))
}

/// The table key of an instance.
pub(crate) fn row(k: &InstanceKey) -> InstanceRow<'_> {
    (k.model_name.as_str(), k.host.as_str(), k.port)
}

/// The key bytes redb stores for an instance.
fn row_key(inst: &Instance) -> Vec<u8> {
    <InstanceRow as Value>::as_bytes(&row(&inst.key))
}

/// A raw key shown for a report: `model@host:port` when it decodes, else its bytes; control
/// characters escaped (it goes into log lines).
fn show_key(raw: &[u8]) -> String {
    let decoded = contain(|| {
        let (m, h, p) = <InstanceRow as Value>::from_bytes(raw);
        format!("{m}@{h}:{p}").escape_debug().to_string()
    });
    decoded.unwrap_or_else(|_| format!("{:?}", String::from_utf8_lossy(raw)))
}

/// The key of the instances table, not decoded: the same type name, width and order as
/// [`InstanceRow`] (so redb accepts it for the same table), with the bytes handed over as
/// they are. Decoding is then ours to do, and to fail without panicking.
#[derive(Debug)]
pub(crate) struct RawKey;

impl Value for RawKey {
    type SelfType<'a> = &'a [u8];
    type AsBytes<'a> = &'a [u8];

    fn fixed_width() -> Option<usize> {
        <InstanceRow as Value>::fixed_width()
    }

    fn from_bytes<'a>(data: &'a [u8]) -> &'a [u8]
    where
        Self: 'a,
    {
        data
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a &'b [u8]) -> &'a [u8]
    where
        Self: 'b,
    {
        value
    }

    fn type_name() -> TypeName {
        <InstanceRow as Value>::type_name()
    }
}

impl Key for RawKey {
    fn compare(data1: &[u8], data2: &[u8]) -> Ordering {
        <InstanceRow as Key>::compare(data1, data2)
    }

    fn separator<'a>(left: &'a [u8], right: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        <InstanceRow as Key>::separator(left, right)
    }
}

thread_local! {
    /// Whether a panic on this thread is being contained by [`contain`].
    static CONTAINING: Cell<bool> = const { Cell::new(false) };
    /// The message of the last contained panic on this thread.
    static CONTAINED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic inside it into `Err(message)`. The panic is not printed (the
/// caller reports it as an error); panics elsewhere reach the previous hook as before.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINING.get() {
                let message = info.to_string().replace('\n', " ");
                CONTAINED.set(Some(message));
            } else {
                previous(info);
            }
        }));
    });
    let outer = CONTAINING.replace(true);
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINING.set(outer);
    result.map_err(|payload| {
        CONTAINED.take().unwrap_or_else(|| {
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into())
        })
    })
}
