//! The data directory: initialising it once, and opening it to serve.
//!
//! ```text
//! ordervault-data/        0700
//!   master.key            0600, 64 hex chars (unless ORDERVAULT_MASTER_KEY is set)
//!   policy.toml           the role policy, edited by the operator
//!   vault.db (+ -wal, -shm) SQLite: ciphertexts, fingerprints, wrapped keys, audit log
//! ```
//!
//! Initialisation writes the master key and policy first and commits
//! everything else in one transaction whose last entry marks the vault as
//! initialised; a directory with some of these files but no mark is a
//! half-initialised one, and `serve` refuses it rather than guess.
//!
//! On PostgreSQL ([`Storage::Postgres`]) the database replaces `vault.db`
//! and is shared by every node; each node's data directory holds the same
//! master key (or `ORDERVAULT_MASTER_KEY`) and its `policy.toml`, the file
//! `policy reload` publishes to every node. The policy in force is the one
//! stored in the database.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::SecretString;

use crate::audit::{Action, AuditEvent, Decision};
use crate::crypto::{Algorithm, SecretKey};
use crate::engine::{self, Clock, Engine, EngineConfig, api_key};
use crate::keyring::{self, MASTER_KEY_ENV};
use crate::policy::{DEFAULT_POLICY, Policy};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{PrincipalRecord, Store, StoreError, WriteBatch};

/// Master key file name inside the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// Policy file name inside the data directory.
pub const POLICY_FILE: &str = "policy.toml";
/// Database file name inside the data directory.
pub const DB_FILE: &str = "vault.db";
/// Optional node configuration file inside the data directory.
pub const CONFIG_FILE: &str = "ordervault.toml";
/// Environment variable naming the PostgreSQL database.
pub const STORAGE_URL_ENV: &str = "ORDERVAULT_STORAGE_URL";
/// Roles that `serve --dev` creates a principal for, named after the role.
pub const DEMO_ROLES: [&str; 6] = ["shop", "courier", "supplier", "support", "auditor", "admin"];

/// Problems with the data directory, each with the next step to take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Nothing is initialised there yet.
    #[error(
        "{dir} is not an initialised vault: run `ordervault init --data-dir {dir}` (or `ordervault serve --dev` for a development vault)"
    )]
    NotInitialised {
        /// The directory.
        dir: String,
    },
    /// An earlier initialisation stopped part-way.
    #[error(
        "{dir} holds a half-finished initialisation (found {found}); move it aside and run `ordervault init --data-dir {dir}` again"
    )]
    HalfInitialised {
        /// The directory.
        dir: String,
        /// What was found.
        found: String,
    },
    /// `init` on a directory that already holds a vault.
    #[error("{dir} already holds an initialised vault; refusing to overwrite it")]
    AlreadyInitialised {
        /// The directory.
        dir: String,
    },
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The master key is missing, malformed or wrong.
    #[error(transparent)]
    Keyring(#[from] keyring::KeyringError),
    /// The policy file is invalid.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The database could not be opened or written.
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The engine refused to start.
    #[error(transparent)]
    Engine(#[from] crate::error::VaultError),
    /// The node configuration is invalid.
    #[error("{what}")]
    Config {
        /// What is wrong, and where.
        what: String,
    },
    /// Another running node uses this node id.
    #[error(
        "node id {node:?} is in use by another running node on this database; give every node its own --node-id"
    )]
    NodeIdInUse {
        /// The node id.
        node: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Io { what, source }
}

/// Where a vault's database lives.
#[derive(Clone, Debug, Default)]
pub enum Storage {
    /// `vault.db` in the data directory (the embedded default).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by every node (its URL may hold a
    /// password, so it is kept secret).
    Postgres(SecretString),
}

impl Storage {
    /// The storage `url` names: `postgres://...` (or `postgresql://`), or
    /// `sqlite` for the data directory's file.
    pub fn from_url(url: &str) -> Result<Storage, String> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Storage::Postgres(SecretString::from(url.to_owned())))
        } else if url == "sqlite" {
            Ok(Storage::Sqlite)
        } else {
            Err("the storage URL must start with postgres:// (or be `sqlite`)".into())
        }
    }

    /// The storage of a data directory: `url` if given (flag or
    /// environment), else the `[storage]` table of its `ordervault.toml`,
    /// else SQLite.
    pub fn resolve(dir: &Path, url: Option<&SecretString>) -> Result<Storage, SetupError> {
        use secrecy::ExposeSecret;
        if let Some(url) = url {
            return Storage::from_url(url.expose_secret()).map_err(|e| SetupError::Config {
                what: format!("--storage-url / {STORAGE_URL_ENV}: {e}"),
            });
        }
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Storage::Sqlite),
            Err(e) => return Err(io(format!("cannot read {}", path.display()))(e)),
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            storage: Option<Section>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Section {
            backend: String,
            #[serde(default)]
            url: Option<String>,
        }
        let bad = |what: String| SetupError::Config {
            what: format!("{}: {what}", path.display()),
        };
        let file: File = toml::from_str(&text).map_err(|e| bad(e.message().to_owned()))?;
        let Some(section) = file.storage else {
            return Ok(Storage::Sqlite);
        };
        match (section.backend.as_str(), section.url) {
            ("sqlite", _) => Ok(Storage::Sqlite),
            ("postgres", Some(url)) => Storage::from_url(&url).map_err(bad),
            ("postgres", None) => Err(bad(format!(
                "[storage] backend = \"postgres\" needs url = \"postgres://...\" (or set {STORAGE_URL_ENV})"
            ))),
            (other, _) => Err(bad(format!(
                "unknown storage backend {other:?}; use \"sqlite\" or \"postgres\""
            ))),
        }
    }

    /// Opens the store, creating or migrating its schema (init, serve).
    pub async fn open(&self, layout: &Layout) -> Result<Arc<dyn Store>, SetupError> {
        Ok(match self {
            Storage::Sqlite => Arc::new(SqliteStore::open(&layout.db())?),
            Storage::Postgres(url) => Arc::new(PostgresStore::connect(url).await?),
        })
    }

    /// Opens the store of an initialised vault without changing its schema
    /// (inspection: `audit verify`).
    pub async fn open_existing(&self, layout: &Layout) -> Result<Arc<dyn Store>, SetupError> {
        match self {
            Storage::Postgres(url) => match PostgresStore::connect_existing(url).await? {
                Some(store) => Ok(Arc::new(store)),
                None => Err(SetupError::NotInitialised {
                    dir: layout.shown(),
                }),
            },
            Storage::Sqlite => self.open(layout).await,
        }
    }

    fn shown(&self, layout: &Layout) -> String {
        use secrecy::ExposeSecret;
        match self {
            Storage::Sqlite => layout.db().display().to_string(),
            Storage::Postgres(url) => crate::store::postgres::redacted(url.expose_secret()),
        }
    }
}

/// Where the parts of a vault live.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The data directory.
    pub dir: PathBuf,
    /// The database.
    pub storage: Storage,
}

impl Layout {
    /// The layout of `dir`, with its database in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout {
            dir: dir.into(),
            storage: Storage::Sqlite,
        }
    }
    /// The layout of `dir` with its database in `storage`.
    pub fn with_storage(dir: impl Into<PathBuf>, storage: Storage) -> Layout {
        Layout {
            dir: dir.into(),
            storage,
        }
    }
    /// Path of the master key file.
    pub fn master_key(&self) -> PathBuf {
        self.dir.join(MASTER_KEY_FILE)
    }
    /// Path of the policy file.
    pub fn policy(&self) -> PathBuf {
        self.dir.join(POLICY_FILE)
    }
    /// Path of the database.
    pub fn db(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }
    fn shown(&self) -> String {
        self.dir.display().to_string()
    }
}

/// What the directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum DirState {
    /// Missing or empty.
    Empty,
    /// Initialised and complete.
    Initialised,
    /// Some files, no completion mark.
    Partial(String),
}

/// Inspects the data directory (and, on PostgreSQL, the database) without
/// changing what it holds.
pub async fn dir_state(layout: &Layout) -> Result<DirState, SetupError> {
    let entries: Vec<String> = match std::fs::read_dir(&layout.dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != CONFIG_FILE)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(format!("cannot read {}", layout.shown()))(e)),
    };
    let found = {
        let mut v = entries.clone();
        v.sort();
        v.join(", ")
    };
    if let Storage::Postgres(url) = &layout.storage {
        // Inspect without migrating: the schema may not exist yet.
        let marked = match PostgresStore::connect_existing(url).await? {
            Some(store) => {
                let marked = store.meta(engine::META_INITIALIZED).await;
                store.close().await;
                marked?.as_deref() == Some(b"1")
            }
            None => false,
        };
        return Ok(if marked {
            DirState::Initialised
        } else if entries.is_empty() {
            DirState::Empty
        } else {
            DirState::Partial(found)
        });
    }
    if entries.is_empty() {
        return Ok(DirState::Empty);
    }
    if !layout.db().exists() {
        return Ok(DirState::Partial(found));
    }
    let conn = rusqlite::Connection::open_with_flags(
        layout.db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    );
    let marked = conn
        .and_then(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [engine::META_INITIALIZED],
                |r| r.get::<_, Vec<u8>>(0),
            )
        })
        .map(|v| v == b"1")
        .unwrap_or(false);
    Ok(if marked {
        DirState::Initialised
    } else {
        DirState::Partial(found)
    })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// An API key created at initialisation, shown once.
pub struct CreatedPrincipal {
    /// Principal name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// The API key; only its hash is stored.
    pub api_key: SecretString,
}

impl std::fmt::Debug for CreatedPrincipal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedPrincipal")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("api_key", &"[redacted]")
            .finish()
    }
}

/// Initialises an empty data directory: master key, policy, first data-key
/// version, fingerprint key, and a principal per role in `roles`.
pub async fn init(
    layout: &Layout,
    roles: &[&str],
    chain: &str,
    clock: &dyn Clock,
) -> Result<Vec<CreatedPrincipal>, SetupError> {
    match dir_state(layout).await? {
        DirState::Empty => {}
        DirState::Initialised => {
            return Err(SetupError::AlreadyInitialised {
                dir: match layout.storage {
                    Storage::Sqlite => layout.shown(),
                    Storage::Postgres(_) => layout.storage.shown(layout),
                },
            });
        }
        DirState::Partial(found) => {
            return Err(SetupError::HalfInitialised {
                dir: layout.shown(),
                found,
            });
        }
    }
    std::fs::create_dir_all(&layout.dir)
        .map_err(io(format!("cannot create {}", layout.shown())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("cannot restrict {}", layout.shown())))?;
    }
    let master = if std::env::var_os(MASTER_KEY_ENV).is_some() {
        keyring::load_master_key(&layout.master_key())?
    } else {
        let key = SecretKey::generate();
        let mut text = key.to_hex();
        text.push('\n');
        write_new(&layout.master_key(), text.as_bytes(), 0o600).map_err(io(format!(
            "cannot write {}",
            layout.master_key().display()
        )))?;
        key
    };
    write_new(&layout.policy(), DEFAULT_POLICY.as_bytes(), 0o644)
        .map_err(io(format!("cannot write {}", layout.policy().display())))?;
    let policy = Policy::parse(DEFAULT_POLICY)?;

    let now = clock.now_ms();
    let kek = keyring::kek(&master);
    let mut batch = WriteBatch {
        keys: vec![keyring::new_data_key(
            &kek,
            1,
            Algorithm::Aes256Gcm,
            keyring::state::PRIMARY,
            now,
        )],
        meta: vec![
            (
                engine::META_FINGERPRINT_ROOT.into(),
                keyring::new_fingerprint_root(&kek),
            ),
            // New vaults store tokens under time-ordered keys.
            (
                engine::META_TOKEN_IDS.into(),
                crate::token::TIME_ORDERED_V1.to_vec(),
            ),
        ],
        audit_chain: chain.to_owned(),
        ..Default::default()
    };
    let mut policy_hash = policy.hash_hex();
    policy_hash.truncate(16);
    let rid = hex::encode(crate::crypto::random_bytes::<8>());
    let mut ev = AuditEvent::new(
        now,
        "",
        "",
        Action::Admin,
        Decision::Allowed,
        &rid,
        &policy_hash,
    );
    ev.reason = Some("init".into());
    ev.key_version = Some(1);
    batch.audit.push(ev);
    let mut created = Vec::new();
    for role in roles {
        let (key, hash) = api_key::generate();
        batch.principals.push(PrincipalRecord {
            name: (*role).to_owned(),
            role: (*role).to_owned(),
            key_hash: hash,
            created_ms: now,
            revoked_ms: None,
        });
        let mut ev = AuditEvent::new(
            now,
            "",
            "",
            Action::Admin,
            Decision::Allowed,
            &rid,
            &policy_hash,
        );
        ev.reason = Some(format!("principal_created name={role} role={role}"));
        batch.audit.push(ev);
        created.push(CreatedPrincipal {
            name: (*role).to_owned(),
            role: (*role).to_owned(),
            api_key: key,
        });
    }
    let store = layout.storage.open(layout).await?;
    if store.shared() {
        // Every node enforces the policy stored with the data.
        batch.meta.push((
            engine::META_POLICY.into(),
            DEFAULT_POLICY.as_bytes().to_vec(),
        ));
    }
    // Last, in the same transaction: the vault is complete.
    batch
        .meta
        .push((engine::META_INITIALIZED.into(), b"1".to_vec()));
    let committed = store.commit(batch).await;
    store.close().await;
    committed?;
    Ok(created)
}

/// Opens an initialised data directory into a running engine.
pub async fn open(
    layout: &Layout,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
) -> Result<(Arc<Engine>, Arc<dyn Store>), SetupError> {
    match dir_state(layout).await? {
        DirState::Initialised => {}
        DirState::Empty => {
            return Err(SetupError::NotInitialised {
                dir: layout.shown(),
            });
        }
        DirState::Partial(found) => {
            return Err(SetupError::HalfInitialised {
                dir: layout.shown(),
                found,
            });
        }
    }
    let master = keyring::load_master_key(&layout.master_key())?;
    let mut config = config;
    config.policy_path.get_or_insert_with(|| layout.policy());
    let store = layout.storage.open(layout).await?;
    let policy = match store.meta(engine::META_POLICY).await? {
        // Shared store: the policy in force is the stored one.
        Some(text) => Policy::parse(&String::from_utf8_lossy(&text))?,
        None => Policy::load(&layout.policy())?,
    };
    match store.claim_chain(&config.chain).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            store.close().await;
            return Err(SetupError::NodeIdInUse { node: config.chain });
        }
        Err(e) => {
            store.close().await;
            return Err(e.into());
        }
    }
    let engine = Engine::load(store.clone(), &master, policy, clock, config).await?;
    Ok((Arc::new(engine), store))
}
